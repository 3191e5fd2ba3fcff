"""Shared test fixtures: where the real data lives, and skips with a reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test with a clear reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (only present on the project's machines)")
    return path


def save_tiny_model(folder: Path, texts: list[str], **sizes) -> Path:
    """Build a random-init tiny LLaVA (tokenizer trained on `texts`, TinyConfig(**sizes)) and save it to `folder`."""
    from tinymed.models import TinyConfig, build_tiny_model

    model, processor = build_tiny_model(texts, TinyConfig(**sizes))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
