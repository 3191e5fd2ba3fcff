"""CLI commands: quantize (placeholder until the stage lands)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
