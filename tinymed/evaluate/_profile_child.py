"""Child process of `tinymed profile` on CPU: resident memory of loading, then of answering, from a clean start.

Usage: python -m tinymed.evaluate._profile_child CONFIG_JSON RESULT_JSON
Writes to RESULT_JSON (bytes): baseline_rss (after imports, before loading), load_peak_rss (peak while loading),
after_load_rss (after the loader's freed memory went back to the OS, where glibc allows: `trimmed`),
answer_peak_rss (peak while answering) and `peak_reset`: whether the kernel's peak counter was reset between
loading and answering (Linux /proc/self/clear_refs "5"); without it answer_peak_rss is the peak of the whole
process (`ru_maxrss`), loading included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from pathlib import Path

import psutil
import torch  # noqa: F401  (imported before the baseline so its RSS is not counted as the model's)
import transformers  # noqa: F401

from tinymed.evaluate.memory import ProfileConfig, question_set
from tinymed.io import write_json_atomic
from tinymed.models import generate_answers
from tinymed.quantize import load_for_inference

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss() -> int:
    """Peak resident set since start or the last reset, in bytes (VmHWM on Linux, else ru_maxrss)."""
    if _STATUS.is_file():
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_freed_memory() -> bool:
    """Hand memory the loader freed (e.g. fp32 weights replaced by quantized ones) back to the OS, so it is
    not counted as the answering footprint: glibc's malloc_trim(0). False where there is no glibc."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)  # returns 1 if it released memory, 0 if there was none to release
    except (OSError, AttributeError):  # a libc without malloc_trim (e.g. musl)
        return False
    return True


def main(config_file: str, result_file: str) -> None:
    config = ProfileConfig.model_validate_json(Path(config_file).read_text(encoding="utf-8"))
    images, questions, _ = question_set(config.questions, config.n_questions)
    process = psutil.Process()
    baseline = process.memory_info().rss
    lm = load_for_inference(config.model, device=config.device, quant=config.quant, linear_kernel=config.linear_kernel)
    load_peak = peak_rss()
    trimmed = release_freed_memory()
    after_load = process.memory_info().rss
    reset = reset_peak_rss()
    generate_answers(lm, images, questions, config.max_new_tokens, config.batch_size)
    write_json_atomic(result_file, {
        "baseline_rss": baseline, "load_peak_rss": load_peak, "after_load_rss": after_load,
        "answer_peak_rss": peak_rss(), "peak_reset": reset, "trimmed": trimmed,
    })


if __name__ == "__main__":
    main(*sys.argv[1:3])
