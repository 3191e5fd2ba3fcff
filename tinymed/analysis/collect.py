"""Collect evaluated variants (model × quantization) from run folders (layout: docs/design.md, "Run folders").

A run folder is one of
- a *variant* folder: `variant.json`, `profile.json`, `eval/<dataset>/{metrics,eval_config}.json`,
  optionally `judge/judge_summary.json`;
- a *flat* folder (what `tinymed evaluate/profile/judge --out DIR` write): any of `metrics.json`
  (+ `eval_config.json`), `profile.json`, `judge_summary.json` directly inside;
- a *parent* folder holding several of the above one level down.
An evaluation run with an image control (metrics.json `image_control.kind` shuffled or blank; conventionally in
`eval/<dataset>@<control>/`) is kept in `Variant.controls`, beside the real run in `Variant.metrics`; runs from
before controls existed are real runs. Folders that name the same (name, quant) are merged into one variant.
Unreadable or missing inputs never raise: they are listed in `Variant.gaps`, naming the file and what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

MemoryFigure = Literal["static", "dynamic"]
NO_CONTROL = "none"  # the image control of a real run: each question sees its own image
_MARKERS = ("variant.json", "eval", "metrics.json", "profile.json", "judge_summary.json")


class ReportError(ValueError):
    """A run folder that cannot be used at all (missing, or holding nothing tinymed wrote)."""


def dig(obj: object, *keys: str) -> object:
    """obj[k1][k2]... or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Variant(BaseModel):
    """One model × quantization: its metrics per dataset, profile and judge summary (as read)."""

    name: str
    quant: str | None = None
    sources: list[Path] = Field(default_factory=list, description="folders it was read from")
    metrics: dict[str, dict] = Field(default_factory=dict, description="dataset → metrics.json of the real run")
    controls: dict[str, dict[str, dict]] = Field(
        default_factory=dict, description="dataset → image control (shuffled, blank) → metrics.json")
    profile: dict | None = Field(default=None, description="profile.json")
    judge: dict | None = Field(default=None, description="judge_summary.json")
    info: dict = Field(default_factory=dict, description="variant.json")
    gaps: list[str] = Field(default_factory=list, description="what is missing or unreadable, and where")

    @property
    def static_bytes(self) -> float | None:
        """Weights + buffers in memory (profile.json static.bytes)."""
        return _number(dig(self.profile, "static", "bytes"))

    @property
    def dynamic_bytes(self) -> float | None:
        """Peak memory while generating (profile.json dynamic.peak_bytes)."""
        return _number(dig(self.profile, "dynamic", "peak_bytes"))

    def memory_bytes(self, figure: MemoryFigure) -> float | None:
        return self.static_bytes if figure == "static" else self.dynamic_bytes

    def speed(self, key: str) -> float | None:
        """profile.json speed.batch_1[key]: ttft_ms, decode_tokens_per_s or latency_ms."""
        return _number(dig(self.profile, "speed", "batch_1", key))

    @property
    def quantized_layer_ratio(self) -> float | None:
        """Quantized / original size of the quantized layers, where the profile or variant.json has it."""
        for source in (dig(self.profile, "static"), self.profile, self.info):
            value = _number(dig(source, "quantized_layer_ratio"))
            if value is not None:
                return value
        return None

    def run(self, dataset: str, control: str = NO_CONTROL) -> dict | None:
        """metrics.json of one dataset's real run (or of its run with an image `control`), or None."""
        return self.metrics.get(dataset) if control == NO_CONTROL else self.controls.get(dataset, {}).get(control)

    def metric(self, dataset: str, metric: str, control: str = NO_CONTROL) -> float | None:
        """A dotted metrics.json key (e.g. 'llava_med.closed_accuracy') of `run(dataset, control)`, or None."""
        return _number(dig(self.run(dataset, control), *metric.split(".")))

    def mean_metric(self, metric: str) -> float | None:
        """Mean of `metric` over the datasets that have it (percent), or None."""
        values = [v for v in (self.metric(d, metric) for d in self.metrics) if v is not None]
        return sum(values) / len(values) if values else None

    def judge_score(self, group: str) -> float | None:
        """LLaVA-Med relative score (percent) of a judge group, or None."""
        return _number(dig(self.judge, "groups", group, "relative_score"))


def _read_json(path: Path, gaps: list[str]) -> dict | None:
    """The object in `path`; None (with a gap naming the file) where missing-but-expected or bad."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        gaps.append(f"{path}: malformed JSON (line {exc.lineno}, column {exc.colno})")
        return None
    except OSError as exc:
        gaps.append(f"{path}: unreadable ({exc.strerror})")
        return None
    if not isinstance(value, dict):
        gaps.append(f"{path}: expected a JSON object, found {type(value).__name__}")
        return None
    return value


def _add_run(variant: Variant, source: Path, dataset: str, metrics: dict) -> None:
    """File one evaluation run under its dataset and image control (a gap if that place is taken)."""
    control = str(dig(metrics, "image_control", "kind") or NO_CONTROL)
    runs = variant.metrics if control == NO_CONTROL else variant.controls.setdefault(dataset, {})
    key = dataset if control == NO_CONTROL else control
    if key in runs:
        shown = "" if control == NO_CONTROL else f" with image control {control!r}"
        variant.gaps.append(f"{source}: dataset {dataset!r}{shown} given twice; kept the first")
    else:
        runs[key] = metrics


def _add_eval(variant: Variant, folder: Path, eval_config: dict | None) -> None:
    metrics = _read_json(folder / "metrics.json", variant.gaps)
    if metrics is None:
        variant.gaps.append(f"{folder}: no usable metrics.json")
        return
    dataset = dig(eval_config, "dataset") or folder.name.partition("@")[0]  # eval/<dataset>@<control>/
    _add_run(variant, folder, str(dataset), metrics)


def _first(*values: object) -> str | None:
    return next((str(v) for v in values if v not in (None, "")), None)


def _read_variant_folder(folder: Path) -> Variant:
    gaps: list[str] = []
    info = _read_json(folder / "variant.json", gaps) or {}
    eval_dirs = sorted(p for p in (folder / "eval").glob("*") if p.is_dir())
    configs = {p: _read_json(p / "eval_config.json", gaps) for p in eval_dirs}
    first_config = next((c for c in configs.values() if c), None)
    profile = _read_json(folder / "profile.json", gaps)
    judge = _read_json(folder / "judge" / "judge_summary.json", gaps) or _read_json(
        folder / "judge_summary.json", gaps)
    variant = Variant(
        name=_first(info.get("name"), folder.name),
        quant=_first(info.get("quant"), dig(first_config, "quant"), dig(profile, "quant")),
        sources=[folder], profile=profile, judge=judge, info=info, gaps=gaps,
    )
    for path, config in configs.items():
        _add_eval(variant, path, config)
    return variant


def _read_flat_folder(folder: Path) -> Variant:
    gaps: list[str] = []
    config = _read_json(folder / "eval_config.json", gaps)
    profile = _read_json(folder / "profile.json", gaps)
    judge = _read_json(folder / "judge_summary.json", gaps)
    variant = Variant(
        name=_first(dig(config, "model"), dig(profile, "model"), dig(judge, "model_name"), folder.name),
        quant=_first(dig(config, "quant"), dig(profile, "quant")),
        sources=[folder], profile=profile, judge=judge, gaps=gaps,
    )
    if (folder / "metrics.json").exists():
        _add_eval(variant, folder, config)
    return variant


def _is_variant_folder(folder: Path) -> bool:
    return (folder / "variant.json").exists() or (folder / "eval").is_dir()


def _is_run_folder(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in _MARKERS)


def _read_folder(folder: Path) -> Variant:
    return _read_variant_folder(folder) if _is_variant_folder(folder) else _read_flat_folder(folder)


def _read_run_dir(run_dir: Path) -> list[Variant]:
    if not run_dir.is_dir():
        raise ReportError(f"run folder not found: {run_dir}")
    if _is_run_folder(run_dir):
        return [_read_folder(run_dir)]
    children = [p for p in sorted(run_dir.iterdir()) if p.is_dir() and _is_run_folder(p)]
    if not children:
        raise ReportError(
            f"{run_dir}: neither a variant folder, an evaluate/profile/judge folder, nor a folder of them "
            f"(looked for {', '.join(_MARKERS)} in it and its subfolders)")
    return [_read_folder(child) for child in children]


def _merge(into: Variant, other: Variant) -> None:
    into.sources += other.sources
    into.gaps += other.gaps
    into.profile = into.profile or other.profile
    into.judge = into.judge or other.judge
    into.info = into.info or other.info
    for dataset, metrics in other.metrics.items():
        _add_run(into, other.sources[0], dataset, metrics)
    for dataset, runs in other.controls.items():
        for metrics in runs.values():
            _add_run(into, other.sources[0], dataset, metrics)


def _note_missing(variant: Variant) -> None:
    if not variant.metrics:
        variant.gaps.append("no evaluation metrics (metrics.json) found")
    if variant.profile is None:
        variant.gaps.append("no profile (profile.json) found")


def collect_variants(run_dirs: Iterable[str | Path]) -> list[Variant]:
    """Read every variant under `run_dirs` (in order), merging folders with the same (name, quant).

    Raises ReportError for a folder that does not exist or holds nothing tinymed wrote.
    """
    merged: dict[tuple[str, str | None], Variant] = {}
    for run_dir in run_dirs:
        for variant in _read_run_dir(Path(run_dir)):
            key = (variant.name, variant.quant)
            if key in merged:
                _merge(merged[key], variant)
            else:
                merged[key] = variant
    for variant in merged.values():
        _note_missing(variant)
    return list(merged.values())
