"""The whole paper as one composition of stages.

`run_benchmark` (what `tinymed benchmark` runs) takes a trained model (folder, Hub id or zoo name):
quantized variants (FQ8, FQ4: weight-only quanto int8/int4 in bf16 on CPU, chosen by measurement;
bitsandbytes on CUDA; optionally llama.cpp exports such as q4_k_m, answered through the edge engine) → evaluation of every variant (LLaVA-Med + strict metrics), image controls on the
full-precision one, and a question-only baseline → memory/speed profile of every variant → Pareto report.
`run_demo` (what `tinymed demo` runs) is data (synthetic by default, or real datasets) → fine-tune
(stage 1 alignment + stage 2 instruction tuning) → `run_benchmark`. Outputs stay under `out_dir`:

    out_dir/data/                      synthetic dataset (conversation format), when used
    out_dir/finetune/final/            the fine-tuned model (standard HF LLaVA folder)
    out_dir/variants/<name>/           variant.json, model/ (quantized, or an edge folder for llamacpp-<quant>),
                                       eval/<dataset>[@<control>]/, profile.json; a rerun reuses model/
                                       when variant.json's made_from (source weights, recipe) still holds
    out_dir/baseline/<dataset>/        question-only baseline predictions.jsonl + metrics.json
    out_dir/report/                    report.md, report.html, pareto.{png,svg,json}
    out_dir/summary.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from tinymed.analysis import ReportConfig, build_report
from tinymed.data.carve import training_split_for
from tinymed.data.registry import DatasetSpec as EvalSpec, load_dataset
from tinymed.data.synthetic import SynthConfig, generate_synthetic
from tinymed.evaluate.baseline import QuestionOnlyBaseline
from tinymed.evaluate.memory import ProfileConfig, profile_model
from tinymed.evaluate.metrics import score_predictions
from tinymed.evaluate.image_controls import ImageControl
from tinymed.evaluate.runner import EvalConfig, evaluate, prediction_record, weights_fingerprint
from tinymed.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from tinymed.models.gguf import GGUF_QUANTS, export_gguf
from tinymed.quantize import QuantConfig, default_demo_quant, quantize_model
from tinymed.train import DEMO_DATA, DEMO_MODEL, DEMO_TOWER_CACHE_MB, DatasetSpec, FinetuneConfig, demo_stages, finetune

# progress(description) → a context manager yielding update(done, total)
ProgressFactory = Callable[[str], AbstractContextManager[Callable[[int, int], None]]]


def _no_progress(_description: str):
    return nullcontext(lambda done, total: None)


class VariantOptions(BaseModel):
    """How the variants of a model are made, evaluated and profiled."""

    quant_methods: list[str] | None = Field(
        None, description="`method` or `method:compute_dtype` (QuantConfig.from_spec); None = the measured-best "
        "8-bit and 4-bit backends")
    eval_batch_size: int = 16
    max_new_tokens: int = Field(24, description="enough for the synthetic set's one-line descriptions")
    eval_limit: int | None = None
    device: str = "auto"
    profile: bool = True

    @field_validator("quant_methods")
    @classmethod
    def _one_variant_per_method(cls, specs: list[str] | None) -> list[str] | None:
        methods = [QuantConfig.from_spec(spec).method for spec in specs or []]
        if len(set(methods)) < len(methods):
            raise ValueError(f"each quantization method once (its variant folder is its name): {methods}")
        return specs


class BenchmarkConfig(VariantOptions):
    """Benchmark one trained model: its variants on each dataset's evaluated split (`split`: "test", or a
    carved part such as PathVQA's "train:val10"); the question-only baseline learns from the paired training
    split ("train", or the carve's other part: "train:rest10")."""

    model: str = Field(description="trained model: folder, Hub id or zoo name")
    datasets: list[EvalSpec] = Field(min_length=1)
    out_dir: Path
    image_controls: list[ImageControl] = Field(default_factory=list,
                                               description="controls run on the full-precision variant")
    gguf_quants: list[str] = Field(
        default_factory=list, description="llama.cpp exports to add as variants `llamacpp-<quant>` (f16, q8_0, "
        "q4_k_m, q4_0: `tinymed export gguf`); needs tinymed[edge]")
    tokenizer_gguf: str | None = Field(
        None, description="for gguf_quants of a checkpoint whose tokenizer has no tokenizer.model: the GGUF its "
        "LM came from (zoo models find theirs)")

    @field_validator("gguf_quants")
    @classmethod
    def _known_gguf_quants(cls, quants: list[str]) -> list[str]:
        unknown = [q for q in quants if q not in GGUF_QUANTS]
        if unknown:
            raise ValueError(f"unknown GGUF quantization {unknown}; choose from {', '.join(GGUF_QUANTS)}")
        return quants


class DemoConfig(VariantOptions):
    out_dir: Path = Path("tinymed-demo")
    datasets: list[DatasetSpec] = Field(default_factory=list, description="real datasets; empty = synthetic")
    synth: SynthConfig = Field(default_factory=lambda: DEMO_DATA.model_copy(deep=True))


def _datasets(config: DemoConfig) -> list[DatasetSpec]:
    """The datasets to train and test on: the given ones, or a freshly written synthetic set."""
    if config.datasets:
        return config.datasets
    generate_synthetic(config.out_dir / "data", config.synth)
    return [DatasetSpec(name="synthetic", path=str(config.out_dir / "data"))]


def _baseline(spec: EvalSpec, out: Path) -> dict:
    """Score the question-only baseline on `spec`'s evaluated split; returns its predictions."""
    train = load_dataset(spec.name, spec.path, split=training_split_for(spec.split), language=spec.language).samples
    test = load_dataset(spec.name, spec.path, split=spec.split, language=spec.language).samples
    baseline = QuestionOnlyBaseline(train)
    records = [prediction_record(s, baseline.predict(s), None) for s in test]
    write_jsonl_atomic(out / "predictions.jsonl", records)
    write_json_atomic(out / "metrics.json", score_predictions(records))
    return records


def _made_variant(out: Path, name: str, quant: str, made_from: dict, make: Callable[[Path], Path]) -> Path:
    """The model folder of variant `out/name`, reused when its variant.json records the same `made_from` (the
    source weights' fingerprint and how the variant was made), else made anew by `make(folder)`. variant.json
    is removed before and written after making, so an interrupted make is never taken for a finished one."""
    vdir, info = out / name, out / name / "variant.json"
    if info.is_file() and json.loads(info.read_text()).get("made_from") == made_from and (vdir / "model").is_dir():
        return vdir / "model"
    info.unlink(missing_ok=True)
    model_dir = make(vdir / "model")
    write_json_atomic(info, {"name": name, "quant": quant, "model_dir": str(model_dir), "made_from": made_from})
    return model_dir


def _make_variants(config: BenchmarkConfig) -> dict[str, Path | str]:
    """variant name → model folder: fp32 (the model as given), each transformers quantization, each llama.cpp
    export; each written under out_dir/variants/<name>/ with its variant.json. A rerun reuses the quantized
    folders made from the same weights the same way (their evaluations then resume)."""
    out = config.out_dir / "variants"
    write_json_atomic(out / "fp32" / "variant.json", {"name": "fp32", "quant": "none", "model_dir": config.model})
    variants: dict[str, Path | str] = {"fp32": config.model}
    source = weights_fingerprint(config.model)
    quant_configs = [QuantConfig.from_spec(m) for m in config.quant_methods or []] or default_demo_quant(config.device)
    for quant in quant_configs:
        made_from = {"weights": source, "quant": quant.model_dump(mode="json"), "device": config.device}
        variants[quant.method] = _made_variant(
            out, quant.method, quant.method, made_from,
            lambda folder, quant=quant: quantize_model(config.model, quant, folder, config.device).out_dir)
    for quant in config.gguf_quants:
        made_from = {"weights": source, "gguf": quant, "tokenizer_gguf": config.tokenizer_gguf}
        variants[f"llamacpp-{quant}"] = _made_variant(
            out, f"llamacpp-{quant}", f"llama.cpp-{quant}", made_from,
            lambda folder, quant=quant: export_gguf(config.model, quant, folder, config.tokenizer_gguf))
    return variants


def run_demo(config: DemoConfig, progress: ProgressFactory = _no_progress, say=print) -> dict:
    """Run the pipeline; returns (and writes to out_dir/summary.json) the headline numbers."""
    start = time.perf_counter()
    out = config.out_dir
    say("1/6 data")
    specs = _datasets(config)
    say("2/6 fine-tune (stage 1 alignment → stage 2 instruction tuning)")
    trained = finetune(FinetuneConfig(
        datasets=[DatasetSpec(name=s.name, path=s.path, split="train", language=s.language) for s in specs],
        tiny=DEMO_MODEL, stages=demo_stages(), out_dir=out / "finetune", tower_cache_mb=DEMO_TOWER_CACHE_MB,
    ))
    tests = [EvalSpec(name=s.name, path=s.path, split="test", language=s.language) for s in specs]
    bench = BenchmarkConfig(model=str(trained.model_dir), datasets=tests, out_dir=out,
                            **config.model_dump(include=set(VariantOptions.model_fields)))
    summary = run_benchmark(bench, progress, say, first_step=3, steps=6)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / "summary.json", summary)
    return summary


def run_benchmark(config: BenchmarkConfig, progress: ProgressFactory = _no_progress, say=print,
                  first_step: int = 1, steps: int = 4) -> dict:
    """Variants → evaluation (+ controls, baseline) → profile → report; returns (and writes to
    out_dir/summary.json) the headline numbers."""
    start = time.perf_counter()
    out, specs = config.out_dir, config.datasets
    step = iter(range(first_step, steps + 1))
    say(f"{next(step)}/{steps} quantize")
    variants = _make_variants(config)
    say(f"{next(step)}/{steps} evaluate every variant + the question-only baseline")
    pooled: dict[str, list[dict]] = {"model": [], "baseline": []}
    for name, model_dir in variants.items():
        vdir = out / "variants" / name
        controls = ["none", *config.image_controls] if name == "fp32" else ["none"]
        for spec in specs:
            for control in controls:
                folder = spec.name if control == "none" else f"{spec.name}@{control}"
                with progress(f"evaluate {name} on {folder}") as update:
                    result = evaluate(EvalConfig(
                        model=str(model_dir), dataset=spec.name, path=spec.path, split=spec.split,
                        language=spec.language, out_dir=vdir / "eval" / folder, batch_size=config.eval_batch_size,
                        max_new_tokens=config.max_new_tokens, limit=config.eval_limit, device=config.device,
                        image_control=control,
                    ), on_progress=update)
                if name == "fp32" and control == "none":
                    pooled["model"] += read_jsonl(result.out_dir / "predictions.jsonl")
    for spec in specs:
        pooled["baseline"] += _baseline(spec, out / "baseline" / spec.name)
    if config.profile:
        say(f"{next(step)}/{steps} profile memory and speed")
        for name, model_dir in variants.items():
            with progress(f"profile {name}"):
                profile_model(ProfileConfig(model=str(model_dir), device=config.device, out_dir=out / "variants" / name))
    say(f"{steps}/{steps} report")
    report = build_report(ReportConfig(run_dirs=[out / "variants"], out_dir=out / "report"))
    summary = {
        "model": score_predictions(pooled["model"]),
        "baseline": score_predictions(pooled["baseline"]),
        "model_dir": config.model,
        "variants": {name: str(d) for name, d in variants.items()},
        "pareto_front": report.front,
        "report": str(report.out_dir / "report.md"),
        "datasets": [s.model_dump() for s in specs],
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
