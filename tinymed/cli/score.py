"""CLI: `tinymed score` — LLaVA-Med v1 and strict metrics for a predictions.jsonl file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

_COLUMNS = (  # (header, section, key)
    ("LM open", "llava_med", "open_recall"),
    ("LM closed", "llava_med", "closed_accuracy"),
    ("EM open", "strict", "open_exact_match"),
    ("F1 open", "strict", "open_token_f1"),
    ("EM closed", "strict", "closed_exact_match"),
    ("yes/no", "strict", "closed_yes_no_accuracy"),
)
_CAPTION = ("LM = LLaVA-Med v1 scorer (open: mean recall; closed: reference is a substring). "
            "Strict: EM exact match, F1 token F1, yes/no first yes/no word. Percent; — = no items.")  # fmt: skip
_BREAKDOWN_FIELDS = ("answer_type", "question_type")


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _row(label: str, summary: dict) -> list[str]:
    cells = (_cell(summary[section][key]) for _, section, key in _COLUMNS)
    return [label, str(summary["n"]), *cells]


def metrics_table(result: dict, title: str) -> Table:
    table = Table(title=title, caption=_CAPTION)
    table.add_column("group", no_wrap=True)
    table.add_column("n", justify="right")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    table.add_row(*_row("all", result), end_section=True)
    for name in _BREAKDOWN_FIELDS:
        table.add_row(f"[bold]{name}[/bold]")
        for value, summary in result["by"].get(name, {}).items():
            table.add_row(*_row(f"  {value}", summary))
        table.add_section()
    return table


def _extra_line(llava_med: dict) -> str:
    names = ("open_precision", "open_f1", "open_exact_match", "open_bleu1", "open_bleu2", "open_bleu3")
    return "LLaVA-Med open: " + ", ".join(f"{name[5:]} {_cell(llava_med[name])}" for name in names)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("score")
    def score(
        predictions: Path = typer.Argument(
            ..., exists=True, dir_okay=False, help="predictions.jsonl to score."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
        out: Path | None = typer.Option(None, "--out", help="Also write the metrics JSON here (atomically)."),
    ) -> None:
        """Score predictions with the LLaVA-Med v1 scorer (published numbers) and strict metrics."""
        from tinymed.evaluate.metrics import PredictionsError, read_predictions, score_predictions
        from tinymed.io import write_json_atomic

        err = Console(stderr=True)
        try:
            result = score_predictions(read_predictions(predictions))
        except PredictionsError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        if out is not None:
            write_json_atomic(out, result)
            err.print(f"wrote {out}", highlight=False)
        if as_json:
            typer.echo(json.dumps(result, ensure_ascii=False))
            return
        console = Console()
        console.print(metrics_table(result, f"{predictions} — {result['errors']} errors (scored as empty)"))
        console.print(_extra_line(result["llava_med"]), highlight=False)
