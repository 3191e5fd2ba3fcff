"""Export a model as a plain transformers folder (the zoo's assembled model, or any checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tinymed.io import write_folder_atomic
from tinymed.models.zoo import resolve_model


def export_hf(model: str, out: str | Path) -> Path:
    """Copy the resolved folder of `model` (a zoo name is assembled first) to `out`, atomically."""
    source = Path(resolve_model(model))
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no local model folder with a config.json (Hub ids: download them first)")
    return write_folder_atomic(Path(out), lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
