"""Pareto plot: memory (MiB) on x, accuracy (%) on y, every variant labelled, the front as a step line.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel

from tinymed.analysis.pareto import front_staircase

MIB = 2**20


class PlotPoint(BaseModel):
    """One labelled variant; memory in bytes, accuracy in percent; None where unmeasured."""

    label: str
    memory_bytes: float | None
    accuracy: float | None


def _figure(points: list[PlotPoint], title: str, x_label: str, y_label: str) -> Figure:
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = [p for p in points if p.memory_bytes is not None and p.accuracy is not None]
    for point in drawn:
        x = point.memory_bytes / MIB
        ax.scatter([x], [point.accuracy], color="tab:blue", zorder=3)
        ax.annotate(point.label, (x, point.accuracy), xytext=(5, 5), textcoords="offset points", fontsize=8)
    staircase = front_staircase([(p.memory_bytes, p.accuracy) for p in drawn])
    if staircase:
        xs, ys = zip(*[(m / MIB, a) for m, a in staircase], strict=True)
        ax.step(xs, ys, where="post", color="tab:red", label="Pareto front", zorder=2)
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:red", s=120, zorder=4)
        ax.legend(loc="lower right", fontsize=8)
    missing = len(points) - len(drawn)
    note = f"\n({missing} variant(s) not plotted: memory or accuracy missing)" if missing else ""
    ax.set_title(title + note, fontsize=10)
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    return fig


def _save(fig: Figure, path: Path, fmt: str) -> Path:
    """Render to a temp file beside `path`, then rename (atomic, like tinymed.io)."""
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"Date": None} if fmt == "svg" else None  # reproducible SVG
    fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
    tmp.replace(path)
    return path


def plot_pareto(points: list[PlotPoint], stem: Path, title: str, x_label: str, y_label: str) -> list[Path]:
    """Write `stem`.png and `stem`.svg (each atomically); returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(points, title, x_label, y_label)
    return [_save(fig, stem.parent / f"{stem.name}.{fmt}", fmt) for fmt in ("png", "svg")]

