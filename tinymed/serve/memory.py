"""The server's memory: what it holds (for /health) and handing freed memory back to the OS.

Why the latter: decoding a large image and preprocessing it frees tens of MB at a time; glibc keeps freed
memory in its arenas for reuse instead of returning it, so after rounds of large images a server that
holds ~200 MB of live objects showed 1–2 GB resident, growing round after round (measured with
`bench/serve_soak.py` and glibc's mallinfo2: the growth was free arena memory, not live objects; one
`malloc_trim(0)` took resident memory from 1992 to 580 MiB). The server trims whenever its last request
in flight has ended (`middleware.ReleaseMemoryWhenIdle`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
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


def release_freed_memory() -> None:
    """Return the memory the allocator holds free to the OS (glibc `malloc_trim(0)`; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
