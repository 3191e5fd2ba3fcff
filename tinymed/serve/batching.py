"""Request batching: a bounded queue and one worker thread that owns the model.

The worker takes the oldest waiting job, then waits for more jobs with the same sampling settings
(`Job.batch_key`) until `max_batch` — up to `batch_wait_ms`, and at most `wait_share` of how long recent
batches took, so a model that answers in milliseconds barely waits — and hands the group to `run_batch` (the engine),
which generates for all of them together and streams every row's tokens back as they come. Streaming
and non-streaming requests share batches (streaming is per row, not per batch). A batch, once started,
runs to its end: requests that arrive meanwhile wait for the next batch (no continuous batching), which
is why the wait matters: clients whose answers came out together send their next requests a few
to a few hundred milliseconds apart (their JSON bodies and images are parsed one after another), and a
batch that starts before they are in runs a fragment (measured 2026-12-04 on the real 270M model, 8
clients, 32 requests: at 5 ms, batches of 1, 7, 1, 8, 3, 5, 3, 4 in 39 s; at 50 ms, 8, 8, 8, 8 in one run
and 7, 4, 8, 8, 5 in another; at 250 ms, capped at 5% of this model's 5-6 s batches, 8, 8, 8, 8).
A full queue refuses new jobs (`QueueFull` → HTTP 503 with Retry-After) instead of growing. The server
takes its place in the queue (`Batcher.place`) before it decodes the image, so a full queue is refused
before anything is allocated; a job whose client left or whose time ran out leaves the queue at once
(`Batcher.cancel`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydantic import BaseModel, Field


class BatchConfig(BaseModel):
    """How requests are grouped; `max_batch=1` turns batching off."""

    max_batch: int = Field(8, ge=1, description="requests generated together at most")
    batch_wait_ms: float = Field(250.0, ge=0, description="longest the first request waits for companions, ms")
    wait_share: float = Field(0.05, ge=0, le=1, description="and at most this share of the longest of the last "
                              "8 batches' run time (the first batch: batch_wait_ms)")
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


@dataclass(eq=False)  # jobs are compared by identity (queue removal), never by their images
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
    min_tokens: int = 0  # the end-of-answer token is ignored until this many tokens are out
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batch_key(self) -> tuple[float, int]:
        """Jobs batch together only with equal sampling settings (greedy rows never share a sampled batch)
        and equal `min_tokens` (one generate call applies one)."""
        return self.temperature, self.min_tokens

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class Batcher:
    """The queue and its worker thread; `run_batch(jobs)` must emit a final event for every job."""

    def __init__(self, run_batch: Callable[[list[Job]], None], config: BatchConfig = BatchConfig()):
        self.config = config
        self._run_batch = run_batch
        self._pending: deque[Job] = deque()
        self._held = 0  # places taken by requests still being prepared (image decoding)
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._recent_runs: deque[float] = deque(maxlen=8)  # seconds each of the last batches took

    @property
    def pending(self) -> int:
        """Jobs waiting, and places held for jobs being prepared."""
        return len(self._pending) + self._held

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

    @contextmanager
    def place(self) -> Iterator[Callable[[Job], None]]:
        """Hold a place in the queue (or raise `QueueFull`) while a job is prepared; call the yielded
        function to queue the job in it. Leaving the block without queueing frees the place."""
        with self._cond:
            if self.pending >= self.config.max_queue:
                raise QueueFull(f"{self.pending} requests are waiting already (limit {self.config.max_queue})")
            self._held += 1
        held = True

        def submit(job: Job) -> None:
            nonlocal held
            with self._cond:
                self._held -= 1
                held = False
                self._pending.append(job)
                self._cond.notify_all()

        try:
            yield submit
        finally:
            if held:
                with self._cond:
                    self._held -= 1

    def submit(self, job: Job) -> None:
        """Queue a job (or raise `QueueFull`)."""
        with self.place() as submit:
            submit(job)

    def cancel(self, job: Job) -> None:
        """The job's client is gone or its time ran out: out of the queue if it is still there, else its row
        stops at the next token."""
        job.cancelled.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._busy = len(batch)
            started = time.monotonic()
            try:
                self._run_batch(batch)
            except Exception as exc:  # the engine failed the whole batch; every job still gets an answer
                for job in batch:
                    job.emit(Failed(500, f"generation failed ({type(exc).__name__})", "generation_failed"))
            finally:
                self._recent_runs.append(time.monotonic() - started)
                self._busy = 0
                del batch  # not kept (with its images) while the worker waits for the next one

    def _gather_window(self) -> float:
        """Seconds the first job of a batch waits for companions."""
        wait = self.config.batch_wait_ms / 1000
        if self._recent_runs:
            wait = min(wait, self.config.wait_share * max(self._recent_runs))
        return wait

    def _take_companion(self, key: tuple[float, int]) -> Job | None:
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
            gather_until = time.monotonic() + self._gather_window()
            while len(batch) < self.config.max_batch:
                if (job := self._take_companion(batch[0].batch_key)) is not None:
                    batch.append(job)
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch
