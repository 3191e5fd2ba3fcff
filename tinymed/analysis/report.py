"""`tinymed report`: Pareto front (memory ↓, accuracy ↑) over variants, plots, report.md/.html, pareto.json."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from tinymed.analysis.collect import NO_CONTROL, MemoryFigure, Variant, collect_variants, dig
from tinymed.analysis.document import Block, Bullets, Heading, Image, Paragraph, Table, cell, to_html, to_markdown
from tinymed.analysis.paper import quoted_section
from tinymed.analysis.pareto import pareto_front
from tinymed.analysis.plot import MIB, PlotPoint, plot_pareto
from tinymed.evaluate.image_controls import IMAGE_CONTROLS
from tinymed.evaluate.judge.summary import GROUP_LABELS
from tinymed.evaluate.metrics import CLOSED_LLAVA_MED, CLOSED_STRICT, OPEN_LLAVA_MED, OPEN_STRICT
from tinymed.io import write_json_atomic, write_text_atomic
from tinymed.quantize import BACKENDS, LAYER_SIZE_TARGETS

ACCURACY_METRICS = tuple([f"llava_med.{key}" for key in OPEN_LLAVA_MED + CLOSED_LLAVA_MED]
                         + [f"strict.{key}" for key in OPEN_STRICT + CLOSED_STRICT])  # fmt: skip
DATASET_LABELS = {"vqa-rad": "VQA-RAD", "slake": "SLAKE", "pathvqa": "PathVQA",
                  "llava-med": "LLaVA-Med", "synthetic": "Synthetic"}  # fmt: skip
_MEMORY_SOURCE = {"static": "profile.json static.bytes", "dynamic": "profile.json dynamic.peak_bytes"}
VQA_CONVENTION = (
    "Open = LLaVA-Med v1 recall (%), Closed = LLaVA-Med v1 accuracy: reference contained in the prediction (%); "
    "strict: Open F1 = token F1 (%), Closed EM = exact match after normalisation (%). "
    "— = no items of that type / dataset not evaluated.")
CONTROLS_CAPTION = (
    "Each real run (every question shown its own image) beside the same model's runs with an image control "
    "(`tinymed evaluate --image-control`): shuffled = every question shown another case's image (a seeded "
    "derangement of the distinct images), blank = a uniform RGB (128, 128, 128) image of the same size. "
    "Closed = LLaVA-Med v1 closed accuracy (%), Open = LLaVA-Med v1 open recall (%); drop = real − control, in "
    "points: a model that reads the images loses points under a control, one that answers from the question alone "
    "does not. — = no items of that type / no real run.")


class ReportConfig(BaseModel):
    """What to report: run folders (variant, evaluate or parent folders), where, and the Pareto axes."""

    run_dirs: list[Path] = Field(min_length=1)
    out_dir: Path
    memory: MemoryFigure = "static"
    accuracy: str = Field("llava_med.closed_accuracy", description="metrics.json key, averaged over datasets")

    @field_validator("accuracy")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in ACCURACY_METRICS:
            raise ValueError(f"unknown accuracy metric {value!r}; choose one of {', '.join(ACCURACY_METRICS)}")
        return value


class VariantPoint(BaseModel):
    """One entry of pareto.json: memory in bytes, speed in tokens/s, accuracy in percent."""

    name: str
    quant: str | None
    static_bytes: float | None
    dynamic_bytes: float | None
    tokens_per_s: float | None
    accuracy: float | None
    metrics: dict[str, dict] = Field(description="dataset → metrics.json without the 'by' breakdowns")
    controls: dict[str, dict[str, dict]] = Field(
        description="dataset → image control → metrics.json without the 'by' breakdowns")
    judge: dict[str, float | None] = Field(description="judge group → relative score (%), where judged")
    on_front: bool
    gaps: list[str]


class ReportResult(BaseModel):
    out_dir: Path
    files: list[Path]
    front: list[str] = Field(description="names of the variants on the Pareto front")
    variants: list[VariantPoint]


def dataset_label(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def metric_label(metric: str) -> str:
    """'llava_med.closed_accuracy' → 'LLaVA-Med v1 closed accuracy (%)'."""
    section, _, key = metric.partition(".")
    prefix = "LLaVA-Med v1" if section == "llava_med" else "strict"
    return f"{prefix} {key.replace('_', ' ')} (%)"


def _paper_order(seen: set[str]) -> list[str]:
    """The paper's three datasets first, then the others alphabetically."""
    known = [d for d in ("vqa-rad", "slake", "pathvqa") if d in seen]
    return known + sorted(seen - set(known))


def ordered_datasets(variants: list[Variant]) -> list[str]:
    """Datasets with a real run in any variant: the paper's three first, then the others alphabetically."""
    return _paper_order({dataset for variant in variants for dataset in variant.metrics})


def _front_gaps(variant: Variant, config: ReportConfig, datasets: list[str]) -> list[str]:
    gaps = []
    if variant.profile is not None and variant.memory_bytes(config.memory) is None:
        gaps.append(f"not on the front: no {config.memory} memory figure ({_MEMORY_SOURCE[config.memory]})")
    if variant.metrics and variant.mean_metric(config.accuracy) is None:
        gaps.append(f"not on the front: no {config.accuracy} value in any metrics.json")
    missing = [d for d in datasets if d not in variant.metrics]
    if variant.metrics and missing:
        gaps.append(f"not evaluated on {', '.join(missing)}: its accuracy is the mean over the others")
    return gaps


def _slim(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key != "by"}


def _points(variants: list[Variant], config: ReportConfig, datasets: list[str]) -> list[VariantPoint]:
    accuracies = [v.mean_metric(config.accuracy) for v in variants]
    on_front = pareto_front([(v.memory_bytes(config.memory), a) for v, a in zip(variants, accuracies, strict=True)])
    return [VariantPoint(
        name=v.name, quant=v.quant, static_bytes=v.static_bytes, dynamic_bytes=v.dynamic_bytes,
        tokens_per_s=v.speed("decode_tokens_per_s"), accuracy=accuracy,
        metrics={d: _slim(m) for d, m in v.metrics.items()},
        controls={d: {c: _slim(m) for c, m in runs.items()} for d, runs in v.controls.items()},
        judge={g: v.judge_score(g) for g in GROUP_LABELS} if v.judge else {},
        on_front=front, gaps=v.gaps + _front_gaps(v, config, datasets),
    ) for v, accuracy, front in zip(variants, accuracies, on_front, strict=True)]


def _vqa_table(variants: list[Variant], datasets: list[str]) -> Table:
    columns = [("llava_med.open_recall", "Open"), ("llava_med.closed_accuracy", "Closed"),
               ("strict.open_token_f1", "Open F1 (strict)"), ("strict.closed_exact_match", "Closed EM (strict)")]
    header = ["Variant", "Quant"] + [f"{dataset_label(d)} {name}" for d in datasets for _, name in columns]
    rows = [[v.name, v.quant or "—"] + [cell(v.metric(d, metric)) for d in datasets for metric, _ in columns]
            + [", ".join(f"{d} {v.metrics[d].get('n', '?')}" for d in datasets if d in v.metrics)]
            for v in variants]  # fmt: skip
    return Table(title="Medical VQA (ours)", caption=VQA_CONVENTION, header=[*header, "Questions"], rows=rows)


def _control_order(control: str) -> tuple[int, str]:
    """The real run first, then the known controls in IMAGE_CONTROLS order, then others alphabetically."""
    known = (NO_CONTROL, *IMAGE_CONTROLS)
    return (known.index(control) if control in known else len(known), control)


def _control_label(control: str, run: dict | None) -> str:
    if control == NO_CONTROL:
        return "real"
    seed = dig(run, "image_control", "seed")
    return control if seed is None else f"{control} (seed {seed})"


def _controls_table(variants: list[Variant]) -> Table:
    """Per variant and dataset with control runs: the real run, then each control with its drop in points."""
    rows = []
    for v in variants:
        for d in _paper_order(set(v.controls)):
            for control in sorted({NO_CONTROL, *v.controls[d]}, key=_control_order):
                cells = []
                for metric in ("llava_med.closed_accuracy", "llava_med.open_recall"):
                    real, value = v.metric(d, metric), v.metric(d, metric, control)
                    drop = None if real is None or value is None else real - value
                    cells += [cell(value), "" if control == NO_CONTROL else cell(drop)]
                run = v.run(d, control)
                n = dig(run, "n")
                rows.append([v.name, v.quant or "—", dataset_label(d), _control_label(control, run), *cells,
                             "—" if n is None else str(n)])
    header = ["Variant", "Quant", "Dataset", "Images", "Closed", "Closed drop (pts)", "Open", "Open drop (pts)",
              "Questions"]
    return Table(title="Image controls (ours)", caption=CONTROLS_CAPTION, header=header, rows=rows)


def _judge_table(variants: list[Variant]) -> Table:
    rows = [[v.name, v.quant or "—", *(cell(v.judge_score(g)) for g in GROUP_LABELS),
             str(v.judge.get("judge_model") or "—")] for v in variants if v.judge]  # fmt: skip
    caption = ("Relative score (%) = mean over questions of the judge's score for the model's answer / its score for "
               "the text-only GPT-4 reference answer × 100 (LLaVA-Med summarize_gpt_review); — = no scored items.")
    return Table(title="LLM-as-judge, LLaVA-Med GPT-4 protocol (ours)", caption=caption,
                 header=["Variant", "Quant", *GROUP_LABELS.values(), "Judge"], rows=rows)


def _methods(variants: list[Variant], part: str) -> str:
    methods = sorted({str(v.profile[part]["method"]) for v in variants
                      if isinstance(v.profile, dict) and isinstance(v.profile.get(part), dict)
                      and v.profile[part].get("method")})  # fmt: skip
    return ", ".join(methods) or "not stated"


def _mib(value: float | None) -> str:
    return cell(None if value is None else value / MIB, 1)


def _memory_table(variants: list[Variant], points: list[VariantPoint], config: ReportConfig) -> Table:
    rows = [[v.name, v.quant or "—", str((v.profile or {}).get("device") or "—"), _mib(v.static_bytes),
             _mib(v.dynamic_bytes), cell(v.speed("latency_ms"), 1), cell(v.speed("decode_tokens_per_s"), 1),
             cell(v.speed("ttft_ms"), 1), cell(v.quantized_layer_ratio, 3), cell(p.accuracy),
             "yes" if p.on_front else "no"] for v, p in zip(variants, points, strict=True)]  # fmt: skip
    caption = (f"Static = weights and buffers in memory (method: {_methods(variants, 'static')}); "
               f"Dynamic = peak memory while generating (method: {_methods(variants, 'dynamic')}); MiB = 2^20 bytes. "
               "Latency, decode tokens/s and time to first token at batch size 1. Quantized-layer ratio = size of the "
               f"quantized layers / their fp32 size. Accuracy = mean over evaluated datasets of "
               f"{metric_label(config.accuracy)}. Front: non-dominated for ({config.memory} memory ↓, accuracy ↑).")
    header = ["Variant", "Quant", "Device", "Static (MiB)", "Dynamic peak (MiB)", "Latency (ms)", "Decode tokens/s",
              "TTFT (ms)", "Quantized-layer ratio", "Accuracy (%)", "Pareto front"]
    return Table(title="Memory and speed (ours)", caption=caption, header=header, rows=rows)


def _size_check(variants: list[Variant]) -> Paragraph | None:
    """Each quantized variant's layer-size ratio against the target for its bit width (known backends only)."""
    checks = []
    for v in variants:
        backend, ratio = BACKENDS.get(v.quant or ""), v.quantized_layer_ratio
        if backend is None or ratio is None:
            continue
        target = LAYER_SIZE_TARGETS[backend.bits]
        checks.append(f"{v.name} ({backend.bits}-bit) {ratio:.1%} ({'met' if ratio <= target else 'NOT met'})")
    if not checks:
        return None
    targets = ", ".join(f"{bits}-bit ≤ {t:.0%}" for bits, t in LAYER_SIZE_TARGETS.items())
    return Paragraph(f"Quantized layers' size as a fraction of the same layers in fp32 (targets: {targets}): "
                     + "; ".join(checks) + ".")


def _plot_all(variants: list[Variant], config: ReportConfig, datasets: list[str]) -> dict[str, list[Path]]:
    """pareto.{png,svg} for the mean accuracy and pareto_<dataset>.{png,svg} per dataset."""
    x_label = f"{config.memory} memory (MiB)"
    y_label = metric_label(config.accuracy)

    def points(accuracy_of) -> list[PlotPoint]:
        return [PlotPoint(label=v.name, memory_bytes=v.memory_bytes(config.memory), accuracy=accuracy_of(v))
                for v in variants]

    plots = {"mean": plot_pareto(points(lambda v: v.mean_metric(config.accuracy)), config.out_dir / "pareto",
                                 f"Mean over datasets: {y_label}", x_label, y_label)}
    for d in datasets:
        plots[d] = plot_pareto(points(lambda v, d=d: v.metric(d, config.accuracy)),
                               config.out_dir / f"pareto_{_file_safe(d)}", f"{dataset_label(d)}: {y_label}",
                               x_label, y_label)
    return plots


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _blocks(variants: list[Variant], points: list[VariantPoint], config: ReportConfig, datasets: list[str],
            plots: dict[str, list[Path]]) -> list[Block]:
    front = [p.name for p in points if p.on_front]
    blocks: list[Block] = [
        Heading("tinymed report", 1),
        Paragraph(f"Variants: {len(variants)} from {', '.join(map(str, config.run_dirs))}. Pareto front for "
                  f"({config.memory} memory ↓, mean {metric_label(config.accuracy)} ↑): "
                  f"{', '.join(front) or 'empty (no variant has both figures)'}."),
        Heading("Medical VQA"),
        _vqa_table(variants, datasets) if datasets else Paragraph("No evaluation metrics were found."),
    ]
    if any(v.controls for v in variants):
        blocks += [Heading("Image controls"), _controls_table(variants)]
    if any(v.judge for v in variants):
        blocks += [Heading("LLM-as-judge"), _judge_table(variants)]
    blocks += [Heading("Memory and speed"), _memory_table(variants, points, config)]
    blocks += [check for check in [_size_check(variants)] if check]
    blocks += [Heading("Pareto front"), Image(plots["mean"][0], "Pareto front, mean accuracy")]
    blocks += [Image(plots[d][0], f"Pareto front, {dataset_label(d)}") for d in datasets]
    blocks += quoted_section({d: dataset_label(d) for d in DATASET_LABELS}, GROUP_LABELS)
    gaps = [f"{p.name}: {gap}" for p in points for gap in p.gaps]
    blocks += [Heading("Gaps"), Bullets(gaps) if gaps else Paragraph("None: every variant has metrics and a profile.")]
    return blocks


def build_report(config: ReportConfig) -> ReportResult:
    """Collect variants, mark the Pareto front, write plots, pareto.json, report.md and report.html."""
    variants = collect_variants(config.run_dirs)
    datasets = ordered_datasets(variants)
    points = _points(variants, config, datasets)
    plots = _plot_all(variants, config, datasets)
    blocks = _blocks(variants, points, config, datasets, plots)
    out = config.out_dir
    pareto = {"memory": config.memory, "accuracy": config.accuracy, "datasets": datasets,
              "variants": [p.model_dump(mode="json") for p in points]}
    files = [write_json_atomic(out / "pareto.json", pareto),
             write_text_atomic(out / "report.md", to_markdown(blocks)),
             write_text_atomic(out / "report.html", to_html(blocks, "tinymed report")),
             *(path for paths in plots.values() for path in paths)]
    return ReportResult(out_dir=out, files=files, front=[p.name for p in points if p.on_front], variants=points)
