"""The server's memory: what it holds (for /health), and giving back what finished requests used.

Measured with `bench/serve_soak.py` and glibc's mallinfo2 after rounds of mixed traffic (4096² images,
malformed ones, abandoned requests), at idle: ~670 MB of malloc'd memory still in use and ~800 MB free
inside glibc's arenas, against ~140 MB in use once `gc.collect()` had run. So two causes: (1) finished
requests kept alive in reference cycles until Python's cyclic collector happened to run — an exception
raised from the decoding thread links its traceback's frames (with the image bytes and pixels) to the
awaiting future, and a per-batch stopping-criterion class held the batch's rows (now a module-level
class in `engine`); (2) glibc keeping freed memory in its arenas rather than returning it to the OS.
So when the server falls idle it collects cycles (cheap: the heap that exists at start-up — model,
libraries — is frozen out of collection: `startup_heap_frozen`) and trims (`malloc_trim(0)`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache


def memory_in_use(device: str) -> dict:
    """Resident memory of this process and, on CUDA, memory held by tensors (bytes)."""
    import psutil

    info = {"rss_bytes": psutil.Process().memory_info().rss}
    if device.startswith("cuda"):
        import torch

        info["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return info


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None (not Linux, or a libc without it such as musl)."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


@contextmanager
def startup_heap_frozen() -> Iterator[None]:
    """While serving, every object alive at start (the loaded model, the libraries) is out of the
    collector's sight, so that collecting when idle only walks what requests allocated."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_freed_memory() -> None:
    """Free what finished requests left in reference cycles, then return the memory the allocator holds
    free to the OS (glibc `malloc_trim(0)`; only the collection elsewhere)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
