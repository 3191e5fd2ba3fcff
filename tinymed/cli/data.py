"""CLI: `tinymed data stats|export|synth` — inspect, convert and generate medical VQA datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tinymed.cli.data_synth import synth
from tinymed.data import DATASETS, DataError, DatasetStats, dataset_stats, load_dataset, write_conversation

data_app = typer.Typer(help="Inspect, export and generate medical VQA datasets.", no_args_is_help=True)
_console = Console()
_errors = Console(stderr=True)

_DATASET_HELP = f"Dataset name: {', '.join(DATASETS)}."
_SHOWN_SKIPS = 10
_PATH_HELP = "Local copy (folder or file). Omit for the Hub copy, or the default synthetic dataset."


def _load(dataset: str, path: str | None, split: str, language: str, skip_invalid: bool, check_images: bool):
    """load_dataset, turning a DataError into a one-line message on stderr and exit code 1."""
    try:
        return load_dataset(
            dataset, path, split, language=language, skip_invalid=skip_invalid, check_images=check_images
        )
    except DataError as exc:
        _fail(exc)


def _fail(exc: DataError) -> None:
    """Report a data error on stderr (one unwrapped line, no traceback) and exit with code 1."""
    _errors.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
    raise typer.Exit(1) from None


def _stats_table(stats: DatasetStats, title: str) -> Table:
    table = Table(title=title)
    table.add_column("group", no_wrap=True)
    table.add_column("n", justify="right")
    for label, value in (("rows", stats.n), ("open", stats.open), ("closed", stats.closed),
                         ("distinct images", stats.images), ("skipped rows", stats.skipped)):  # fmt: skip
        table.add_row(label, str(value))
    for name in ("question_type", "modality", "organ", "content_type"):
        counts = getattr(stats, f"by_{name}")
        if counts:
            table.add_section()
            table.add_row(f"[bold]{name}[/bold]")
            for value, count in counts.items():
                table.add_row(f"  {value}", str(count))
    return table


@data_app.command("stats")
def stats(
    dataset: str = typer.Option(..., "--dataset", help=_DATASET_HELP),
    path: str | None = typer.Option(None, "--path", help=_PATH_HELP),
    split: str = typer.Option("test", "--split", help="train, validation (validate/val) or test."),
    language: str = typer.Option("en", "--language", help="en, zh or all (SLAKE and conversation files)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip bad rows (counted) instead of failing."),
    check_images: bool = typer.Option(False, "--check-images", help="Also open every image (PIL verify)."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout."),
) -> None:
    """Rows, open/closed, distinct images, breakdowns by question type / modality / organ."""
    result = _load(dataset, path, split, language, skip_invalid, check_images)
    summary = dataset_stats(result)
    if as_json:
        print(summary.model_dump_json())
        return
    _console.print(_stats_table(summary, f"{dataset} / {split}"))
    _console.print(f"source: {summary.source}", soft_wrap=True, highlight=False)
    for row in result.skipped[:_SHOWN_SKIPS]:
        _errors.print(f"skipped {row.file} row {row.row}: {row.reason}", soft_wrap=True, highlight=False)
    if len(result.skipped) > _SHOWN_SKIPS:
        _errors.print(f"... and {len(result.skipped) - _SHOWN_SKIPS} more skipped rows")


@data_app.command("export")
def export(
    dataset: str = typer.Option(..., "--dataset", help=_DATASET_HELP),
    path: str | None = typer.Option(None, "--path", help=_PATH_HELP),
    split: str = typer.Option("test", "--split", help="train, validation (validate/val) or test."),
    out: Path = typer.Option(..., "--out", help="Output .json (or .jsonl) in the conversation format."),
    language: str = typer.Option("en", "--language", help="en, zh or all (SLAKE and conversation files)."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip bad rows (counted) instead of failing."),
) -> None:
    """Write a dataset split in the LLaVA-Med conversation format (images referenced, not copied)."""
    result = _load(dataset, path, split, language, skip_invalid, check_images=False)
    try:
        written = write_conversation(result.samples, out)
    except DataError as exc:
        _fail(exc)
    _console.print(f"wrote {len(result.samples)} samples to {written} ({len(result.skipped)} rows skipped)")


data_app.command("synth")(synth)


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the app."""
    app.add_typer(data_app, name="data", help="Inspect, export and generate medical VQA datasets.")
