"""The `tinymed` command line: a thin layer over the stages (one module per command group)."""

from __future__ import annotations

import logging
import os

import typer

from tinymed import __version__
from tinymed.cli import data, demo, evaluate, finetune, judge, quantize, report, score, serve, zoo

app = typer.Typer(
    help="tinymed: fine-tune, quantize, evaluate and deploy small medical multimodal LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tinymed {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """tinymed: fine-tune, quantize, evaluate and deploy small medical multimodal LLMs."""


for module in (data, score, finetune, evaluate, quantize, judge, report, serve, demo, zoo):
    module.register(app)


def _quiet_torchao_import() -> None:
    """With torchao installed (an optional quantization backend), every transformers model import loads it, and
    on a CPU torch it logs that its CUDA-only kernels (_C_mxfp8, _C_cutlass_90a) failed to load and that it
    registers Enums the deprecated way. Neither matters to tinymed: drop those two messages."""
    logging.getLogger("torchao").addFilter(lambda record: not record.getMessage().startswith("Failed to load"))
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "register_constant() on Enum subclasses" not in record.getMessage()
    )


def main() -> None:
    # Our own progress bars are the ones to watch; keep library bars and chatter out of the terminal.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _quiet_torchao_import()
    app()
