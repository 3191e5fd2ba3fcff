"""Batched evaluation: a model (local, quantized, or behind an OpenAI-compatible endpoint) answers a
dataset's questions → `predictions.jsonl` + `metrics.json` (+ `eval_config.json`).

Greedy decoding, left padding, KV cache, `batch_size` questions per forward pass. Predictions are
appended to `predictions.partial.jsonl` as they are made, so an interrupted run resumes where it
stopped (only when the model and its weights on disk, data, decoding and image control are the same), and a
finished run is not repeated: its files are returned as they are (`resume=False`, `--fresh`, answers anew).
The final files are written atomically. A sample whose image cannot be read, or whose generation fails, is
recorded with its `error` and the run goes on. `image_control` (tinymed.evaluate.image_controls) shows each
question its own image, another case's, or a blank one; it is recorded in metrics.json and eval_config.json
as {"kind", "seed"}, and each prediction records the image it was shown.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from tinymed.data import DataError, MedVQASample
from tinymed.data.registry import load_dataset
from tinymed.evaluate.image_controls import ImageControl, ImagePlan
from tinymed.evaluate.metrics import score_predictions
from tinymed.io import append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic
from tinymed.models.loading import LinearKernelChoice
from tinymed.models.zoo import resolve_model

PREDICTIONS = "predictions.jsonl"
PARTIAL = "predictions.partial.jsonl"
PARTIAL_KEY = "predictions.partial.key"


class EvalConfig(BaseModel):
    model: str | None = Field(None, description="checkpoint folder or Hub id (local evaluation)")
    quant: str | None = Field(None, description="quantization method applied on load (None = as saved)")
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    model_name: str | None = Field(None, description="model name to request from the endpoint")
    api_key: str | None = None
    dataset: str = "synthetic"
    path: str | None = None
    split: str = "test"
    language: str = "en"
    out_dir: Path
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    limit: int | None = Field(None, ge=1)
    device: str = "auto"
    linear_kernel: LinearKernelChoice = Field("aten", description="fp32 CPU linear kernel: aten, onednn or auto (tinymed.models.kernels)")
    skip_invalid: bool = False
    resume: bool = True
    image_control: ImageControl = Field("none", description="none (own image), shuffled (another case's) or blank")
    control_seed: int = Field(0, description="seed of the shuffled control's permutation")


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    n: int
    errors: int
    skipped_rows: int
    seconds: float


def prediction_record(sample: MedVQASample, prediction: str, error: str | None,
                      image_shown: dict | None = None) -> dict:
    """One predictions.jsonl line: the sample, its metadata, what the model said (or why it failed) and the
    image it was shown (`ImagePlan.show`'s record; null when none was: unreadable, or a question-only answer)."""
    return {
        "id": sample.id,
        "dataset": sample.dataset,
        "split": sample.split,
        "image": sample.image,
        "question": sample.question,
        "answer": sample.answer,
        "answer_type": sample.answer_type.value,
        "prediction": prediction,
        "error": error,
        "image_shown": image_shown,
        **sample.metadata(),
    }


# An answerer takes a batch of (sample, image) and returns one answer string per sample.
Answerer = Callable[[Sequence[MedVQASample], Sequence], list[str]]


def local_answerer(config: EvalConfig) -> tuple[Answerer, dict]:
    """Answer with a local (possibly quantized) model; returns the answerer and a description."""
    from tinymed.models import generate_batch
    from tinymed.quantize import load_for_inference

    lm = load_for_inference(config.model, device=config.device, quant=config.quant, linear_kernel=config.linear_kernel)

    def answer(samples, images):
        out = generate_batch(lm, images, [s.question for s in samples], config.max_new_tokens)
        return [a.text for a in out]

    return answer, {"model": config.model, "quant": lm.quant, "engine": lm.engine, "device": lm.device,
                    "linear_kernel": lm.linear_kernel}


def image_data_url(image) -> str:
    """PNG data URL of a PIL image (what the OpenAI image_url content part carries)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def endpoint_answerer(config: EvalConfig) -> tuple[Answerer, dict]:
    """Answer through an OpenAI-compatible chat-completions endpoint (tinymed serve, vLLM, Ollama...)."""
    from openai import OpenAI

    client = OpenAI(base_url=config.endpoint, api_key=config.api_key or "not-needed", max_retries=3)
    model_name = config.model_name or client.models.list().data[0].id

    def ask(sample: MedVQASample, image) -> str:
        reply = client.chat.completions.create(
            model=model_name,
            temperature=0,
            max_tokens=config.max_new_tokens,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": sample.question},
            ]}],
        )
        return (reply.choices[0].message.content or "").strip()

    pool = ThreadPoolExecutor(max_workers=config.batch_size)

    def answer(samples, images):
        return list(pool.map(ask, samples, images))

    return answer, {"model": model_name, "endpoint": config.endpoint, "quant": config.quant or "as served"}


def _answer_batch(answer: Answerer, batch: Sequence[MedVQASample], plan: ImagePlan) -> list[dict]:
    """Answer one batch with the images `plan` shows; a sample whose image fails, or a batch whose generation
    fails, gets `error`."""
    records: dict[str, dict] = {}
    ready, images, shown = [], [], []
    for sample in batch:
        try:
            image, record = plan.show(sample)
        except DataError as exc:
            records[sample.id] = prediction_record(sample, "", str(exc))
            continue
        ready.append(sample)
        images.append(image)
        shown.append(record)
    if ready:
        try:
            for sample, text, record in zip(ready, answer(ready, images), shown, strict=True):
                records[sample.id] = prediction_record(sample, text, None, record)
        except Exception as exc:  # one bad batch must not kill a long run
            for sample, record in zip(ready, shown, strict=True):
                records[sample.id] = prediction_record(
                    sample, "", f"generation failed: {type(exc).__name__}: {exc}", record)
    return [records[s.id] for s in batch]


def weights_fingerprint(model: str | None) -> list:
    """Which weights `model` names now: the folder it resolves to (a zoo name: its assembled folder, keyed by
    the shipped files) and each file's name, size and modification time; a Hub id as given."""
    if model is None:
        return []
    folder = Path(resolve_model(model))
    if not folder.is_dir():
        return [str(model)]
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return [str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _run_key(config: EvalConfig, plan: ImagePlan) -> str:
    """What makes two runs' predictions interchangeable (resume only continues the same run): the model and
    its weights on disk, data, decoding and image control (kind, seed and which image each case is shown)."""
    fields = ("model", "quant", "endpoint", "model_name", "dataset", "path", "split", "language", "max_new_tokens")
    key = [getattr(config, f) for f in fields] + weights_fingerprint(config.model) + plan.fingerprint()
    if config.linear_kernel != "aten":  # runs from before the option keep their keys
        key.append(config.linear_kernel)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _resumable_predictions(run_key: str, out: Path) -> dict[str, dict]:
    """Predictions an interrupted run with the same `run_key` left behind, by sample id."""
    partial, key_file = out / PARTIAL, out / PARTIAL_KEY
    if not (partial.exists() and key_file.exists()):
        return {}
    if json.loads(key_file.read_text()).get("key") != run_key:
        return {}
    return {r["id"]: r for r in read_jsonl(partial)}


def _finished_run(run_key: str, out: Path) -> EvalResult | None:
    """The result a completed run with the same `run_key` wrote to `out`, if there is one."""
    files = [out / name for name in ("eval_config.json", "metrics.json", PREDICTIONS)]
    if not all(f.exists() for f in files):
        return None
    described = json.loads(files[0].read_text())
    if described.get("run_key") != run_key:
        return None
    return _result(out, json.loads(files[1].read_text()), read_jsonl(files[2]),
                   len(described.get("skipped_rows", [])), described.get("seconds", 0.0))


def _result(out: Path, metrics: dict, records: list[dict], skipped_rows: int, seconds: float) -> EvalResult:
    """The EvalResult of a run's scored records."""
    errors = sum(1 for r in records if r["error"])
    return EvalResult(out, metrics, len(records), errors, skipped_rows, seconds)


def evaluate(config: EvalConfig, on_progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Run the evaluation described by `config`; `on_progress(done, total)` is called after each batch."""
    if (config.model is None) == (config.endpoint is None):
        raise ValueError("give exactly one of a model (--model) or an endpoint (--endpoint)")
    start = time.perf_counter()
    loaded = load_dataset(
        config.dataset, config.path, split=config.split, language=config.language,
        skip_invalid=config.skip_invalid, limit=config.limit,
    )
    samples = loaded.samples
    plan = ImagePlan.build(config.image_control, samples, config.control_seed)
    run_key = _run_key(config, plan)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished_run(run_key, out) if config.resume else None
    if finished:
        return finished
    partial = out / PARTIAL
    done = _resumable_predictions(run_key, out) if config.resume else {}
    if not done:
        partial.unlink(missing_ok=True)
        write_json_atomic(out / PARTIAL_KEY, {"key": run_key})
    todo = [s for s in samples if s.id not in done]
    answer, described = (endpoint_answerer if config.endpoint else local_answerer)(config)
    if on_progress:
        on_progress(len(samples) - len(todo), len(samples))
    for i in range(0, len(todo), config.batch_size):
        for record in _answer_batch(answer, todo[i : i + config.batch_size], plan):
            append_jsonl(partial, record)
            done[record["id"]] = record
        if on_progress:
            on_progress(len(samples) - len(todo) + min(i + config.batch_size, len(todo)), len(samples))
    records = [done[s.id] for s in samples]
    metrics = {**score_predictions(records), "image_control": plan.describe()}
    seconds = time.perf_counter() - start
    write_jsonl_atomic(out / PREDICTIONS, records)
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "eval_config.json", {
        **described,
        "dataset": config.dataset, "path": config.path or loaded.source, "split": config.split,
        "limit": config.limit, "batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens,
        "image_control": plan.describe(),
        "skipped_rows": [vars(r) for r in loaded.skipped], "seconds": round(seconds, 2), "run_key": run_key,
    })
    partial.unlink(missing_ok=True)
    (out / PARTIAL_KEY).unlink(missing_ok=True)
    return _result(out, metrics, records, len(loaded.skipped), seconds)
