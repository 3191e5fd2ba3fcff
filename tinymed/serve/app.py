"""`tinymed serve`: the clinician's web page and an OpenAI-compatible chat-completions API (FastAPI).

Routes: `/` (the page; its scripts and styles come from `/static`, nothing from the network),
`POST /v1/chat/completions` (stream or not), `GET /v1/models`, `GET /health`, and `POST /api/preview`
(the page's upload: the image decoded exactly as the model will see it, returned as a PNG).

A request without an image is answered with a black image: the LLaVA prompt template always carries
one, and a black image is the most neutral one (what tinymed does for text-only use, e.g. as a judge).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinymed.serve import protocol
from tinymed.serve.audit import AuditLog, AuditRecord
from tinymed.serve.batching import Batcher, BatchConfig, Delta, Failed, Finished, Job, QueueFull, Started
from tinymed.serve.engine import Engine
from tinymed.serve.images import DecodedImage, ImageError, ImageLimits, decode_data_url, decode_image, png_data_url
from tinymed.serve.protocol import ApiError
from tinymed.serve.security import bearer_matches

STATIC = Path(__file__).parent / "static"
BLANK_SIZE = 64  # pixels; the processor resizes it anyway
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class ServeConfig(BaseModel):
    """Server policy: access, limits, batching, audit."""

    api_key: str | None = Field(None, description="required as `Authorization: Bearer` on /v1 and /api when set")
    model_name: str | None = Field(None, description="name clients ask for (default: the model folder's name)")
    image: ImageLimits = ImageLimits()
    batch: BatchConfig = BatchConfig()
    max_body_bytes: int = Field(32 * 2**20, gt=0, description="request body, bytes (base64 adds a third)")
    max_question_chars: int = Field(4000, gt=0)
    max_tokens_limit: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, gt=0)
    request_timeout_s: float = Field(120.0, gt=0, description="queue wait + generation, seconds")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 when the queue is full")
    audit_db: Path | None = Field(None, description="SQLite file for the audit log (off when None)")
    audit_questions: bool = Field(False, description="store question text in the audit log")


def load_served_model(model: str, device: str = "auto", quant: str | None = None):
    """Load a plain or quantized checkpoint the way evaluation does."""
    from tinymed.quantize import load_for_inference

    return load_for_inference(model, device=device, quant=quant)


def memory_in_use(device: str) -> dict:
    """Resident memory of this process and, on CUDA, memory held by tensors (bytes)."""
    import psutil

    info = {"rss_bytes": psutil.Process().memory_info().rss}
    if device.startswith("cuda"):
        import torch

        info["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    return info


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether announced or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, _too_large_message(self.max_bytes), "request_too_large")
            return message

        await self.app(scope, counted, send)


def _too_large_message(max_bytes: int) -> str:
    return f"request body exceeds {max_bytes} bytes"


def _too_large(max_bytes: int) -> JSONResponse:
    error = ApiError(413, _too_large_message(max_bytes), "request_too_large")
    return JSONResponse(error.body(), status_code=413, headers={"connection": "close"})


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", "invalid_request", param)


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class _Call:
    """One chat completion in flight: its job, its event queue, and its audit record."""

    def __init__(self, app_state, request_id: str):
        self.state = app_state
        self.id = request_id
        self.question: str | None = None
        self.stream = False
        self.t0 = time.perf_counter()
        self.events: asyncio.Queue = asyncio.Queue()
        self.audited = False

    def emitter(self):
        loop = asyncio.get_running_loop()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopped)
                pass

        return emit

    async def next_event(self, job: Job):
        """The next event; a request past its deadline (plus a grace second) is failed here."""
        remaining = job.deadline - time.monotonic() + 1.0
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(remaining, 0.01))
        except TimeoutError:
            job.cancelled.set()
            return Failed(504, "request timed out", "timeout")

    def audit(self, status: int, prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        if self.audited or self.state.audit is None:
            return
        self.audited = True
        self.state.audit.record(AuditRecord(
            request_id=self.id, model=self.state.model_name, quant=self.state.lm.quant, status=status,
            latency_ms=(time.perf_counter() - self.t0) * 1000, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, stream=self.stream, question=self.question,
        ))


def create_app(lm, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving `lm` (a `LoadedModel`); the batch worker runs while the app is up."""
    engine = Engine(lm)
    batcher = Batcher(engine.run_batch, config.batch)
    audit = AuditLog(config.audit_db, config.audit_questions) if config.audit_db else None
    model_name = config.model_name or lm.name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)
        if audit is not None:
            audit.close()

    app = FastAPI(title="tinymed", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lm, app.state.batcher, app.state.audit, app.state.model_name = lm, batcher, audit, model_name
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def require_key(request: Request) -> None:
        if config.api_key and not bearer_matches(request.headers.get("authorization"), config.api_key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "invalid_api_key")

    async def decode(image_url: str | None) -> DecodedImage:
        if image_url is None:
            return DecodedImage(Image.new("RGB", (BLANK_SIZE, BLANK_SIZE)), "no image (black)")
        try:
            return await run_in_threadpool(decode_data_url, image_url, config.image)
        except ImageError as exc:
            raise ApiError(exc.status, str(exc), exc.code, "messages") from None

    def parse(body: bytes) -> protocol.ChatRequest:
        try:
            return protocol.ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def max_tokens_of(req: protocol.ChatRequest) -> int:
        wanted = req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens_limit)
        if wanted > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {wanted}; this server allows at most {config.max_tokens_limit}",
                           "max_tokens_too_large", "max_tokens")
        return wanted

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        ready = batcher.alive
        body = {
            "status": "ready" if ready else "not ready", "model": model_name, "quant": lm.quant, "device": lm.device,
            "memory": memory_in_use(lm.device), "queue": {"waiting": batcher.pending, "running": batcher.in_flight,
                                                         "max_waiting": config.batch.max_queue,
                                                         "max_batch": config.batch.max_batch},
            "auth_required": bool(config.api_key),
            "limits": {"max_tokens": config.max_tokens_limit, "max_question_chars": config.max_question_chars,
                       "max_image_bytes": config.image.max_bytes, "max_image_pixels": config.image.max_pixels},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "tinymed"}]}

    @app.post("/api/preview", dependencies=[Depends(require_key)])
    async def preview(request: Request, frame: int | None = None):
        """The uploaded file (raw body) decoded as the model will see it, as a PNG data URL."""
        data = await request.body()
        try:
            decoded = await run_in_threadpool(decode_image, data, config.image, frame)
        except ImageError as exc:
            raise ApiError(exc.status, str(exc), exc.code, "file") from None
        width, height = decoded.image.size
        return {"image": png_data_url(decoded.image), "width": width, "height": height,
                "source": decoded.source}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        call = _Call(app.state, f"chatcmpl-{uuid.uuid4().hex}")
        try:
            return await answer(call, request)
        except ApiError as exc:  # every refusal and failure is audited too
            call.audit(exc.status)
            raise

    async def answer(call: _Call, request: Request):
        req = parse(await request.body())
        call.stream = req.stream
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           "model_not_found", "model")
        asked = protocol.conversation(req)
        if len(asked.question) > config.max_question_chars:
            raise ApiError(400, f"the question is {len(asked.question)} characters; the limit is "
                                f"{config.max_question_chars}", "question_too_long", "messages")
        max_tokens, stops = max_tokens_of(req), req.stop_list()
        call.question = asked.question
        image = (await decode(asked.image_url)).image
        job = Job(image=image, question=asked.question, max_tokens=max_tokens, temperature=req.temperature,
                  stop=stops, deadline=time.monotonic() + config.request_timeout_s, emit=call.emitter())
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}; retry shortly", "queue_full",
                           headers={"retry-after": str(config.retry_after_s)}) from None
        first = await _await_event(call, job, request)
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, first.code)
        headers = {"x-request-id": call.id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(call, job, first, model_name, include_usage),
                                     media_type="text/event-stream", headers=headers | {"cache-control": "no-cache"})
        return JSONResponse(await _collect(call, job, first, model_name, request), headers=headers)

    return app


async def _await_event(call: _Call, job: Job, request: Request):
    """Wait (while the request is queued) for the job to start or fail; a client that leaves cancels it."""
    while True:
        try:
            return await asyncio.wait_for(call.next_event(job), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ApiError(499, "client closed the request", "client_closed") from None


async def _collect(call: _Call, job: Job, event, model_name: str, request: Request) -> dict:
    """Wait for the whole answer (non-streaming)."""
    while not isinstance(event, Finished | Failed):
        event = await _await_event(call, job, request)
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message, event.code)
    call.audit(200, event.prompt_tokens, event.completion_tokens)
    return protocol.completion(call.id, model_name, event.text, event.finish_reason, event.prompt_tokens,
                               event.completion_tokens)


async def _stream(call: _Call, job: Job, first: Started, model_name: str, include_usage: bool):
    """SSE chunks as OpenAI sends them: role, content deltas, finish reason, [usage], [DONE]."""
    try:
        yield _sse(protocol.chunk(call.id, model_name, {"role": "assistant", "content": ""}))
        while True:
            event = await call.next_event(job)
            if isinstance(event, Delta):
                yield _sse(protocol.chunk(call.id, model_name, {"content": event.text}))
            elif isinstance(event, Finished):
                yield _sse(protocol.chunk(call.id, model_name, {}, event.finish_reason))
                if include_usage:
                    usage = protocol.usage(event.prompt_tokens, event.completion_tokens)
                    yield _sse(protocol.chunk(call.id, model_name, None, usage_=usage))
                yield _sse("[DONE]")
                call.audit(200, event.prompt_tokens, event.completion_tokens)
                return
            elif isinstance(event, Failed):
                yield _sse(ApiError(event.status, event.message, event.code).body())
                call.audit(event.status)
                return
    finally:
        job.cancelled.set()  # a client that left mid-stream frees its row at the next token
        call.audit(499)


def serve(lm, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted (after checking the bind is safe)."""
    import uvicorn

    from tinymed.serve.security import check_bind

    check_bind(host, config.api_key)
    uvicorn.run(create_app(lm, config), host=host, port=port, log_level="info")
