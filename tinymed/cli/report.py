"""CLI: `tinymed report` — Pareto front over variants, plots, report.md/.html and pareto.json."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _variants_table(result, memory: str, accuracy: str) -> Table:
    table = Table(title=f"Pareto front: {memory} memory ↓, mean {accuracy} ↑")
    for header in ("variant", "quant", f"{memory} MiB", "accuracy %", "tokens/s", "front", "gaps"):
        table.add_column(header, justify="left" if header in ("variant", "quant", "gaps") else "right")
    for point in result.variants:
        memory_bytes = point.static_bytes if memory == "static" else point.dynamic_bytes
        table.add_row(
            point.name, point.quant or "—",
            "—" if memory_bytes is None else f"{memory_bytes / 2**20:.1f}",
            "—" if point.accuracy is None else f"{point.accuracy:.2f}",
            "—" if point.tokens_per_s is None else f"{point.tokens_per_s:.1f}",
            "[green]yes[/green]" if point.on_front else "no",
            str(len(point.gaps)) if point.gaps else "",
        )
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("report")
    def report(
        run_dirs: list[Path] = typer.Argument(
            ..., metavar="RUN_DIR...", help="Variant folders, evaluate folders, or folders holding them."),
        out: Path = typer.Option(..., "--out", help="Folder for report.md, report.html, pareto.{png,svg,json}."),
        memory: str = typer.Option("static", "--memory", help="Memory figure for the front: static or dynamic."),
        accuracy: str = typer.Option("llava_med.closed_accuracy", "--accuracy",
                                     help="metrics.json key averaged over datasets, e.g. strict.open_token_f1."),
    ) -> None:
        """Mark the Pareto front (memory ↓, accuracy ↑) over variants; write plots and the report."""
        from pydantic import ValidationError

        from tinymed.analysis import ReportConfig, ReportError, build_report

        err = Console(stderr=True)
        try:
            config = ReportConfig(run_dirs=run_dirs, out_dir=out, memory=memory, accuracy=accuracy)
            result = build_report(config)
        except ValidationError as exc:
            messages = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            err.print(f"[red]error:[/red] {messages}", highlight=False)
            raise typer.Exit(2) from None
        except ReportError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        console = Console()
        console.print(_variants_table(result, memory, accuracy))
        for point in result.variants:
            for gap in point.gaps:
                console.print(f"[yellow]{point.name}[/yellow]: {gap}", highlight=False)
        console.print(f"front: {', '.join(result.front) or '(empty)'}; wrote {out / 'report.md'}, "
                      f"{out / 'report.html'} and {len(result.files) - 2} more files", highlight=False)
