"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import typer


def cpu_linear_option(default: str):
    """`--cpu-linear`: the kernel of the fp32 CPU linear layers (`tinymed.models.kernels`)."""
    return typer.Option(default, "--cpu-linear", help="Kernel of the fp32 CPU linear layers: aten (PyTorch's "
                        "default), onednn (faster on CPUs measured here; same weights and answers) or auto (onednn "
                        "where it applies: transformers on the CPU).")
