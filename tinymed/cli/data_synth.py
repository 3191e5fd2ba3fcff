"""`tinymed data synth`: write the synthetic medical VQA set (registered by tinymed/cli/data.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tinymed.cli.progress import counting_progress
from tinymed.data.synthetic import SynthConfig, generate_synthetic, parse_emphasis

_DEFAULTS = SynthConfig()
_console = Console()


def synth(
    out: Path = typer.Option(..., "--out", help="Output folder: train.json, test.json, images/, meta.json."),
    n_train: int = typer.Option(_DEFAULTS.n_train, "--n-train", min=1, help="Questions (rows) in the train split."),
    n_test: int = typer.Option(_DEFAULTS.n_test, "--n-test", min=1, help="Questions (rows) in the test split."),
    seed: int = typer.Option(_DEFAULTS.seed, "--seed", help="Same seed, same files (byte for byte)."),
    image_size: int = typer.Option(_DEFAULTS.image_size, "--image-size", min=32, max=1024, help="PNG side in pixels."),
    questions_per_image: float = typer.Option(
        _DEFAULTS.questions_per_image, "--questions-per-image", min=1.0, max=8.0, help="Mean questions per image."
    ),
    emphasis: list[str] = typer.Option(
        [], "--emphasis", help="KIND=FACTOR: ask that question kind FACTOR times as often, train split only "
                               "(repeatable; the demo's are in tinymed.train.DEMO_DATA)."),
    paired: bool = typer.Option(
        _DEFAULTS.train_paired, "--paired", help="Train split only: ask each value verification of its image "
                                                 "both ways (true value: yes; another: no)."),
) -> None:
    """Generate the deterministic synthetic medical VQA set (X-ray, CT, MRI, histology).

    VQA-RAD-style questions, balanced so that the question alone predicts nothing; sizes count questions.
    """
    try:
        config = SynthConfig(n_train=n_train, n_test=n_test, seed=seed, image_size=image_size,
                             questions_per_image=questions_per_image, train_emphasis=parse_emphasis(emphasis),
                             train_paired=paired)
    except ValueError as error:  # a malformed KIND=FACTOR or an unknown kind
        raise typer.BadParameter(f"--emphasis: {error}") from None
    with counting_progress("generating") as update:
        result = generate_synthetic(out, config, progress=update)
    table = Table(title=f"synthetic, seed {seed}, {image_size} px")
    for column in ("split", "images", "questions"):
        table.add_column(column, justify="right" if column != "split" else "left")
    table.add_row("train", str(result.n_train_images), str(result.n_train_questions))
    table.add_row("test", str(result.n_test_images), str(result.n_test_questions))
    _console.print(table)
    _console.print(f"wrote {result.out_dir} (meta.json last)", soft_wrap=True, highlight=False)
