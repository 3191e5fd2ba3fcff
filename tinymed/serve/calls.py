"""One chat completion in flight (`Call`): its job's events, its client's disconnect, its deadline and its
audit row; and the ASGI middleware (`ChatCalls`) that gives every chat-completion request a `Call` and
makes sure it is audited exactly once and leaves nothing behind, whatever answered it (the route, an
error handler, another middleware's refusal) and however it ended (answered, refused, client gone)."""

from __future__ import annotations

import asyncio
import time
import uuid

from tinymed.serve.audit import AuditLog, AuditRecord
from tinymed.serve.batching import Batcher, Failed, Job

CHAT_PATH = "/v1/chat/completions"
DEADLINE_GRACE_S = 1.0  # the engine fails a late row itself; the server answers 504 this much later at most
CLIENT_CLOSED = 499  # nginx's status for a client that left before the answer
GONE = Failed(CLIENT_CLOSED, "client closed the request", "client_closed")


class Call:
    """A chat completion: created by `ChatCalls`, given its job by the route (`attach`)."""

    def __init__(self, audit: AuditLog | None, model: str, quant: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.question: str | None = None
        self.stream = False
        self.t0 = time.perf_counter()
        self.events: asyncio.Queue = asyncio.Queue()
        self._audit, self._model, self._quant = audit, model, quant
        self._audited = False
        self._job: Job | None = None
        self._batcher: Batcher | None = None
        self._watcher: asyncio.Task | None = None

    def emitter(self):
        """The job's `emit`: hands worker-thread events to the event loop."""
        loop = asyncio.get_running_loop()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopped)
                pass

        return emit

    def attach(self, job: Job, batcher: Batcher, receive) -> None:
        """The job is queued: from now on a client that leaves (seen on `receive`, the request body being
        read) or a deadline that passes takes it out of the queue or stops its row."""
        self._job, self._batcher = job, batcher
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._batcher.cancel(self._job)
        self.events.put_nowait(GONE)

    async def next_event(self):
        """The job's next event: `GONE` (499) when the client has left, `Failed` 504 when the deadline
        (plus a grace second) has passed."""
        job = self._job
        timeout = max(job.deadline - time.monotonic() + DEADLINE_GRACE_S, 0.01)
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            self._batcher.cancel(job)
            return Failed(504, "request timed out", "timeout")

    def audit(self, status: int, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        """Write the audit row (once; later calls do nothing)."""
        if self._audited or self._audit is None:
            return
        self._audited = True
        self._audit.record(AuditRecord(
            request_id=self.id, model=self._model, quant=self._quant, status=status,
            latency_ms=(time.perf_counter() - self.t0) * 1000, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, stream=self.stream, question=self.question,
        ))

    def close(self) -> None:
        """The request is over: stop watching the client, and stop the job if it is still queued or running."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._job is not None:
            self._batcher.cancel(self._job)
            self._job = None  # its image is freed now, not when the server drops the request's scope


class ChatCalls:
    """ASGI middleware: a `Call` for each chat-completion request (in `scope["tinymed.call"]`), audited
    with the status the client got — 499 when it left before the whole answer, 500 on an unexpected error
    — and closed when the response is over. Every response, errors included, names the audit row's
    request id in its `x-request-id` header."""

    def __init__(self, app, audit: AuditLog | None, model: str, quant: str):
        self.app, self.audit, self.model, self.quant = app, audit, model, quant

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        call = scope["tinymed.call"] = Call(self.audit, self.model, self.quant)
        status, complete = CLIENT_CLOSED, False

        async def watched_send(message):
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", call.id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            call.audit(500)
            raise
        finally:
            call.close()
            call.audit(status if complete else CLIENT_CLOSED)
