"""The `tinymed` command line: a thin layer over the stages (one module per command group)."""

from __future__ import annotations

import typer

from tinymed.cli import data, demo, evaluate, finetune, judge, quantize, report, score, serve

app = typer.Typer(
    help="tinymed: fine-tune, quantize, evaluate and deploy small medical multimodal LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (data, score, finetune, evaluate, quantize, judge, report, serve, demo):
    module.register(app)


def main() -> None:
    app()
