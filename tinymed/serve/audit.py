"""Optional audit log in SQLite: one row per chat completion. Never images; the question text only when
the operator opts in (`log_questions`)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from pydantic import BaseModel

SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    time REAL NOT NULL,            -- Unix time, seconds
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    quant TEXT NOT NULL,
    status INTEGER NOT NULL,       -- HTTP status (499: the client left before the answer)
    latency_ms REAL NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    stream INTEGER NOT NULL,
    question TEXT                  -- NULL unless question logging is on
)"""


class AuditRecord(BaseModel):
    request_id: str
    model: str
    quant: str
    status: int
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream: bool = False
    question: str | None = None


class AuditLog:
    """Append-only request log; safe to call from any thread."""

    def __init__(self, path: str | Path, log_questions: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log_questions = log_questions
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)

    def record(self, rec: AuditRecord) -> None:
        question = rec.question if self.log_questions else None
        row = (time.time(), rec.request_id, rec.model, rec.quant, rec.status, rec.latency_ms,
               rec.prompt_tokens, rec.completion_tokens, int(rec.stream), question)
        with self._lock:
            self._db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def close(self) -> None:
        with self._lock:
            self._db.close()
