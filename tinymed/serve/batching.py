"""Request batching: a bounded queue and one worker thread that owns the model.

The worker takes the oldest waiting job, then waits up to `batch_wait_ms` for more jobs with the same
sampling settings (`Job.batch_key`) until `max_batch`, and hands the group to `run_batch` (the engine),
which generates for all of them together and streams every row's tokens back as they come. Streaming
and non-streaming requests share batches (streaming is per row, not per batch). A batch, once started,
runs to its end: requests that arrive meanwhile wait for the next batch (no continuous batching).
A full queue refuses new jobs (`QueueFull` → HTTP 503 with Retry-After) instead of growing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, Field


class BatchConfig(BaseModel):
    """How requests are grouped; `max_batch=1` turns batching off."""

    max_batch: int = Field(8, ge=1, description="requests generated together at most")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the first request waits for companions, ms")
    max_queue: int = Field(64, ge=1, description="waiting requests at most; beyond it new ones get 503")


class QueueFull(RuntimeError):
    """The queue holds `max_queue` jobs already."""


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    status: int
    message: str
    code: str


Event = Started | Delta | Finished | Failed


@dataclass
class Job:
    """One chat completion to generate. `emit` is called from the worker thread with each event;
    `cancelled` is set by the server when the client goes away (the row stops at its next token)."""

    image: object  # RGB PIL image
    question: str
    max_tokens: int
    temperature: float
    stop: list[str]
    deadline: float  # time.monotonic() after which the job is abandoned
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batch_key(self) -> float:
        """Jobs batch together only with equal sampling settings (greedy rows never share a sampled batch)."""
        return self.temperature

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class Batcher:
    """The queue and its worker thread; `run_batch(jobs)` must emit a final event for every job."""

    def __init__(self, run_batch: Callable[[list[Job]], None], config: BatchConfig = BatchConfig()):
        self.config = config
        self._run_batch = run_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return self._busy

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="tinymed-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the waiting jobs (server shutting down), stop the worker."""
        with self._cond:
            self._stopping = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in waiting:
            job.emit(Failed(503, "server is shutting down", "shutting_down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (limit {self.config.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._busy = len(batch)
            try:
                self._run_batch(batch)
            except Exception as exc:  # the engine failed the whole batch; every job still gets an answer
                for job in batch:
                    job.emit(Failed(500, f"generation failed ({type(exc).__name__})", "generation_failed"))
            finally:
                self._busy = 0

    def _take_companion(self, key: float) -> Job | None:
        for job in self._pending:
            if job.batch_key == key:
                self._pending.remove(job)
                return job
        return None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._pending.popleft()]
            gather_until = time.monotonic() + self.config.batch_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                if (job := self._take_companion(batch[0].batch_key)) is not None:
                    batch.append(job)
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch
