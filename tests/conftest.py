"""Shared test fixtures: where the real data lives, and skips with a reason when it is absent."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
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


def audit_rows(db: Path, reply, columns: str = "status") -> list[tuple]:
    """The serve audit log's rows of one reply (found by its x-request-id header), waiting for them: a row is
    written as its response ends."""
    deadline = time.monotonic() + 5
    with closing(sqlite3.connect(db)) as connection:
        while not (rows := connection.execute(
                f"SELECT {columns} FROM requests WHERE request_id = ?", (reply.headers["x-request-id"],)).fetchall()):
            assert time.monotonic() < deadline, "not audited"
            time.sleep(0.02)
    return rows
