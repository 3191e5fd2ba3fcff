"""Static / dynamic memory and speed of a (possibly quantized) model answering a fixed question set.

- static: bytes of the loaded model's weights + buffers, quantization scales / zero points / packed
  states included (tinymed.quantize.sizes), and the weight files' size on disk;
- dynamic: peak memory while answering the question set at the evaluation batch size: on CUDA
  `torch.cuda.max_memory_allocated` after a reset (weights included); on CPU the peak resident set of
  a fresh child process while answering (Linux: the peak counter is reset after loading, so a loader's
  transient copies are reported apart as load_peak_bytes, and glibc's malloc_trim first returns what the
  loader freed) minus its resident set after imports;
- speed: time to first token, decode tokens/s and whole-answer latency, medians over `runs` runs after
  `warmup` runs, at batch 1 and at the evaluation batch size, each generating exactly max_new_tokens.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from tinymed.io import write_json_atomic
from tinymed.models.loading import LinearKernelChoice

QUESTIONS = [
    "Is there a lesion in the left lung?",
    "What modality is this image?",
    "Is this an axial slice?",
    "Which organ is shown?",
    "Is there evidence of a fracture?",
    "Where is the abnormality located?",
    "Is the heart enlarged?",
    "How many masses are visible?",
]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ProfileConfig(BaseModel):
    model: str = Field(description="checkpoint folder (plain or tinymed-quantized) or Hub id")
    quant: str | None = Field(None, description="quantize a plain checkpoint on load with this method")
    device: str = "auto"
    linear_kernel: LinearKernelChoice = Field("aten", description="fp32 CPU linear kernel: aten, onednn or auto (tinymed.models.kernels)")
    out_dir: Path | None = Field(None, description="where profile.json goes (None = not written)")
    questions: Path | None = Field(None, description="conversation-format file; None = the built-in set")
    n_questions: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1, description="the evaluation batch size (second speed figure)")
    max_new_tokens: int = Field(16, ge=2)
    warmup: int = Field(1, ge=0)
    runs: int = Field(3, ge=1)
    dynamic: bool = Field(True, description="measure peak memory (on CPU: in a child process)")


class StaticMemory(BaseModel):
    bytes: int
    disk_bytes: int | None = Field(description="weight files in the model folder; None for a Hub id")
    quantized_layer_bytes: int | None = None
    quantized_layer_bytes_fp32: int | None = None
    quantized_layer_ratio: float | None = None
    unit: str = "bytes"
    method: str = (
        "sum over weights and buffers (quantized: int data + scales + zero points / bnb quant_state), "
        "each tensor once; disk: *.safetensors/*.bin files"
    )


class DynamicMemory(BaseModel):
    peak_bytes: int = Field(description="peak while answering the set, weights included")
    baseline_bytes: int | None = None
    load_peak_bytes: int | None = Field(None, description="CPU: peak while loading, above the baseline")
    after_load_bytes: int | None = Field(None, description="CPU: resident after loading, above the baseline")
    unit: str = "bytes"
    method: str


class SpeedFigure(BaseModel):
    batch_size: int
    ttft_ms: float = Field(description="preprocess + prefill + first token, per batch")
    decode_tokens_per_s: float = Field(description="tokens after the first, summed over the batch, per second")
    latency_ms: float = Field(description="whole answer (batch): preprocess to last token")
    new_tokens: int
    runs: int
    warmup: int
    method: str = "median over runs; exactly new_tokens generated per answer (min_new_tokens); greedy"


class QuestionSet(BaseModel):
    source: str
    n: int
    sha256: str = Field(description="of the questions' text and the images' RGB bytes")


class ProfileResult(BaseModel):
    model: str
    quant: str
    device: str
    linear_kernel: str = "aten"  # profiles from before the option ran on PyTorch's default
    dtype: str
    questions: QuestionSet
    static: StaticMemory
    dynamic: DynamicMemory | None
    speed: dict[str, SpeedFigure]
    torch: str
    versions: dict[str, str]
    seconds: float


def synthetic_image(index: int, size: int = 224):
    """A deterministic grey-scale 'scan': a disc whose position and brightness depend on `index`."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    cx, cy, r = size * (0.3 + 0.05 * index), size * (0.6 - 0.04 * index), size * 0.2
    pixels = 40 + 0.3 * x + 120 * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).convert("RGB")


def question_set(questions: Path | None, n: int) -> tuple[list, list[str], QuestionSet]:
    """(images, questions, description) of the fixed set: the first n of a file, or the built-in set."""
    if questions is None:
        qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
        images, source = [synthetic_image(i) for i in range(n)], "builtin"
    else:
        from tinymed.data import load_dataset

        samples = load_dataset("llava-med", questions, split="test").samples[:n]
        qs, images, source = [s.question for s in samples], [s.load_image() for s in samples], str(questions)
    digest = hashlib.sha256()
    for image, q in zip(images, qs):
        digest.update(q.encode("utf-8"))
        digest.update(image.convert("RGB").tobytes())
    return images, qs, QuestionSet(source=source, n=len(qs), sha256=digest.hexdigest())


def disk_bytes(model: str) -> int | None:
    folder = Path(model)
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def static_memory(lm, model: str) -> StaticMemory:
    from tinymed.quantize import BACKENDS, fp32_linear_bytes, module_bytes, modules_bytes, quantized_module_names

    counted = getattr(lm.model, "static_bytes", None)  # an engine's model may count its own (llama.cpp)
    figure = StaticMemory(bytes=counted() if counted else module_bytes(lm.model), disk_bytes=disk_bytes(model))
    quantized = getattr(lm.model, "quantized_bytes", None)  # ... and what it quantized
    if quantized:
        figure.quantized_layer_bytes, figure.quantized_layer_bytes_fp32 = quantized()
    elif lm.quant in BACKENDS:
        names = quantized_module_names(lm.model, BACKENDS[lm.quant])
        figure.quantized_layer_bytes = modules_bytes(lm.model, names)
        figure.quantized_layer_bytes_fp32 = fp32_linear_bytes(lm.model, names)
    if figure.quantized_layer_bytes_fp32:
        figure.quantized_layer_ratio = round(figure.quantized_layer_bytes / figure.quantized_layer_bytes_fp32, 4)
    return figure


def measure_speed(lm, images, questions, batch_size: int, config: ProfileConfig) -> SpeedFigure:
    """Median speed over config.runs batches of `batch_size` (cycling through the set) after warm-up."""
    from tinymed.models.generate import timed_batch

    samples = []
    for run in range(config.warmup + config.runs):
        idx = [(run * batch_size + i) % len(questions) for i in range(batch_size)]
        timing = timed_batch(lm, [images[i] for i in idx], [questions[i] for i in idx], config.max_new_tokens)
        if run >= config.warmup:
            samples.append(timing)
    ttft, tps, latency = (statistics.median(s[k] for s in samples) for k in range(3))
    return SpeedFigure(
        batch_size=batch_size, ttft_ms=round(ttft * 1e3, 2), decode_tokens_per_s=round(tps, 2),
        latency_ms=round(latency * 1e3, 2), new_tokens=config.max_new_tokens, runs=config.runs, warmup=config.warmup,
    )


def cuda_peak_memory(lm, images, questions, config: ProfileConfig) -> DynamicMemory:
    import torch

    from tinymed.models import generate_answers

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    generate_answers(lm, images, questions, config.max_new_tokens, config.batch_size)
    torch.cuda.synchronize()
    return DynamicMemory(
        peak_bytes=torch.cuda.max_memory_allocated(), baseline_bytes=baseline,
        method="torch.cuda.max_memory_allocated after reset_peak_memory_stats, weights included; "
        "baseline_bytes = memory_allocated with the model loaded",
    )


def cpu_peak_memory(config: ProfileConfig, device: str) -> DynamicMemory:
    """Run tinymed.evaluate._profile_child in a fresh interpreter and read what it measured."""
    with tempfile.TemporaryDirectory(prefix="tinymed-profile-") as tmp:
        config_file, result_file = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_file.write_text(config.model_copy(update={"device": device}).model_dump_json(), encoding="utf-8")
        proc = subprocess.run(
            # -P: like the `tinymed` command itself, do not import from the working directory (a folder there
            # named like a library, e.g. `datasets/`, would shadow it in the child only).
            [sys.executable, "-P", "-m", "tinymed.evaluate._profile_child", str(config_file), str(result_file)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"peak-memory child process failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        measured = json.loads(result_file.read_text(encoding="utf-8"))
    baseline = measured["baseline_rss"]
    window = (
        "peak RSS (VmHWM) while answering, the counter reset after loading (/proc/self/clear_refs)"
        if measured["peak_reset"] else "peak RSS of the whole process (ru_maxrss), loading included"
    )
    if measured.get("trimmed"):
        window += "; memory the loader freed returned to the OS first (malloc_trim)"
    return DynamicMemory(
        peak_bytes=measured["answer_peak_rss"] - baseline, baseline_bytes=baseline,
        load_peak_bytes=measured["load_peak_rss"] - baseline, after_load_bytes=measured["after_load_rss"] - baseline,
        method=f"fresh process answering the set at the evaluation batch size: {window}, minus the RSS after "
        "imports and before loading (baseline_bytes); weights included",
    )


def _versions(device: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine()}
    for lib in ("torch", "transformers", "bitsandbytes", "accelerate"):
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            pass
    if device.startswith("cuda"):
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = str(torch.version.cuda)
    return found


def profile_model(config: ProfileConfig) -> ProfileResult:
    """Load the model (through tinymed.quantize.load_for_inference), measure, and write profile.json."""
    import torch

    from tinymed.quantize import load_for_inference

    start = time.perf_counter()
    images, questions, qset = question_set(config.questions, config.n_questions)
    lm = load_for_inference(config.model, device=config.device, quant=config.quant, linear_kernel=config.linear_kernel)
    speed = {f"batch_{b}": measure_speed(lm, images, questions, b, config) for b in sorted({1, config.batch_size})}
    dynamic = None
    if config.dynamic:
        dynamic = cuda_peak_memory(lm, images, questions, config) if lm.device.startswith("cuda") else None
    static = static_memory(lm, config.model)
    dtype = getattr(lm.model, "weights_dtype", None) or str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    device, quant, kernel = lm.device, lm.quant, lm.linear_kernel
    del lm
    if config.dynamic and dynamic is None:
        dynamic = cpu_peak_memory(config, device)
    result = ProfileResult(
        model=config.model, quant=quant, device=device, linear_kernel=kernel, dtype=dtype, questions=qset, static=static,
        dynamic=dynamic, speed=speed, torch=torch.__version__, versions=_versions(device),
        seconds=round(time.perf_counter() - start, 2),
    )
    if config.out_dir is not None:
        write_json_atomic(Path(config.out_dir) / "profile.json", result.model_dump(mode="json"))
    return result
