"""`tinymed serve`: the clinician's web page and an OpenAI-compatible chat-completions API (FastAPI).

Routes: `/` (the page; its scripts and styles come from `/static`, nothing from the network),
`POST /v1/chat/completions` (stream or not), `GET /v1/models`, `GET /health`, and `POST /api/preview`
(the page's upload: the image decoded exactly as the model will see it, returned as a PNG).

A request without an image is answered with a black image: the LLaVA prompt template always carries
one, and a black image is the most neutral one (what tinymed does for text-only use, e.g. as a judge).

Hostile input is bounded before it costs anything: body size, JSON types, question and stop-string
lengths and `max_tokens` are checked first; then the request takes its place in the queue (503 when
full), and only then is its image decoded (its pixel count read from the header first), a few at a time.
Every error is an OpenAI error object; every chat completion is audited (`calls.ChatCalls`).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tinymed.serve import protocol
from tinymed.serve.audit import AuditLog
from tinymed.serve.batching import Batcher, BatchConfig, Delta, Failed, Finished, Job, QueueFull
from tinymed.serve.calls import CLIENT_CLOSED, Call, ChatCalls
from tinymed.serve.engine import Engine
from tinymed.serve.images import DecodedImage, ImageError, ImageLimits, decode_data_url, decode_image, png_data_url
from tinymed.serve.memory import memory_in_use, release_freed_memory, startup_heap_frozen
from tinymed.serve.middleware import BodyLimit, LoopbackOnly, ReleaseMemoryWhenIdle, SecurityHeaders, error_response
from tinymed.serve.protocol import ApiError
from tinymed.serve.security import bearer_matches

STATIC = Path(__file__).parent / "static"
BLANK_SIZE = 64  # pixels; the processor resizes it anyway


class ServeConfig(BaseModel):
    """Server policy: access, limits, batching, audit."""

    api_key: str | None = Field(None, description="required as `Authorization: Bearer` on /v1 and /api when set")
    model_name: str | None = Field(None, description="name clients ask for (default: the model folder's name)")
    image: ImageLimits = ImageLimits()
    batch: BatchConfig = BatchConfig()
    max_body_bytes: int = Field(32 * 2**20, gt=0, description="request body, bytes (base64 adds a third)")
    max_question_chars: int = Field(4000, gt=0)
    max_stop_chars: int = Field(256, gt=0, description="longest stop string (up to 4 of them)")
    max_tokens_limit: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(128, gt=0)
    image_decoders: int = Field(2, ge=1, description="images decoded at the same time at most")
    request_timeout_s: float = Field(120.0, gt=0, description="queue wait + generation, seconds")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 when the queue is full")
    audit_db: Path | None = Field(None, description="SQLite file for the audit log (off when None)")
    audit_questions: bool = Field(False, description="store question text in the audit log")


def load_served_model(model: str, device: str = "auto", quant: str | None = None, linear_kernel: str = "auto"):
    """Load a plain or quantized checkpoint the way evaluation does; by default the fp32 CPU linear layers
    run on oneDNN (`tinymed.models.kernels`: 1.4-1.6× the decode speed here)."""
    from tinymed.quantize import load_for_inference

    return load_for_inference(model, device=device, quant=quant, linear_kernel=linear_kernel)


def _validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """The most specific of pydantic's complaints (the deepest location: inside a union, the branch that
    was meant), as an OpenAI 400 naming the parameter."""
    first = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", "invalid_request", param)


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _answer_limit(config: ServeConfig, engine: Engine) -> tuple[int, str]:
    """The largest max_tokens that can succeed, and why it is that: the server's limit, or the model's
    context less the shortest prompt."""
    room = engine.answer_room(Image.new("RGB", (BLANK_SIZE, BLANK_SIZE)))
    if room is not None and room < 1:
        raise ValueError(f"the model's context of {engine.context_tokens} tokens leaves no room for an answer "
                         "after the prompt")
    if room is None or room >= config.max_tokens_limit:
        return config.max_tokens_limit, "this server allows at most"
    return room, (f"the model's context of {engine.context_tokens} tokens, less a prompt of at least "
                  f"{engine.context_tokens - room} tokens (image included), leaves at most")


def create_app(lm, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving `lm` (a `LoadedModel`); the batch worker runs while the app is up."""
    engine = Engine(lm)
    batcher = Batcher(engine.run_batch, config.batch)
    audit = AuditLog(config.audit_db, config.audit_questions) if config.audit_db else None
    model_name = config.model_name or lm.name
    max_tokens_allowed, max_tokens_reason = _answer_limit(config, engine)
    default_max_tokens = min(config.default_max_tokens, max_tokens_allowed)
    decoding = asyncio.Semaphore(config.image_decoders)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with startup_heap_frozen():
            batcher.start()
            yield
            await run_in_threadpool(batcher.stop)
        if audit is not None:
            audit.close()

    app = FastAPI(title="tinymed", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lm, app.state.batcher, app.state.audit, app.state.model_name = lm, batcher, audit, model_name
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if not config.api_key:
        app.add_middleware(LoopbackOnly)
    app.add_middleware(ChatCalls, audit=audit, model=model_name, quant=lm.quant)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ReleaseMemoryWhenIdle, release=release_freed_memory)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(ApiError.from_status(exc.status_code, str(exc.detail), exc.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):  # while its body was being read
        return error_response(ApiError(CLIENT_CLOSED, "client closed the request", "client_closed"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # logged by the server with its traceback
        return error_response(ApiError(500, "internal server error", "internal_error"))

    def require_key(request: Request) -> None:
        if config.api_key and not bearer_matches(request.headers.get("authorization"), config.api_key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", "invalid_api_key")

    async def decode(image_url: str | None) -> DecodedImage:
        if image_url is None:
            return DecodedImage(Image.new("RGB", (BLANK_SIZE, BLANK_SIZE)), "no image (black)")
        try:
            async with decoding:
                return await run_in_threadpool(decode_data_url, image_url, config.image)
        except ImageError as exc:
            raise ApiError(exc.status, str(exc), exc.code, "messages") from None

    def parse(request: Request, body: bytes) -> protocol.ChatRequest:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, "send the request body as JSON, with Content-Type: application/json",
                           "unsupported_media_type")
        try:
            return protocol.ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def max_tokens_of(req: protocol.ChatRequest) -> int:
        wanted = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if wanted > max_tokens_allowed:
            raise ApiError(400, f"max_tokens is {wanted}; {max_tokens_reason} {max_tokens_allowed}",
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
            "linear_kernel": lm.linear_kernel, "memory": memory_in_use(lm.device), "queue": {"waiting": batcher.pending, "running": batcher.in_flight,
                                                         "max_waiting": config.batch.max_queue,
                                                         "max_batch": config.batch.max_batch},
            "auth_required": bool(config.api_key),
            "limits": {"max_tokens": max_tokens_allowed, "max_question_chars": config.max_question_chars,
                       "max_stop_chars": config.max_stop_chars, "max_image_bytes": config.image.max_bytes,
                       "max_image_pixels": config.image.max_pixels},
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
            async with decoding:
                decoded = await run_in_threadpool(decode_image, data, config.image, frame)
        except ImageError as exc:
            raise ApiError(exc.status, str(exc), exc.code, "file") from None
        width, height = decoded.image.size
        return {"image": png_data_url(decoded.image), "width": width, "height": height,
                "source": decoded.source}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        call: Call = request.scope["tinymed.call"]
        req = parse(request, await request.body())
        call.stream = bool(req.stream)
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           "model_not_found", "model")
        asked = protocol.conversation(req)
        if len(asked.question) > config.max_question_chars:
            raise ApiError(400, f"the question is {len(asked.question)} characters; the limit is "
                                f"{config.max_question_chars}", "question_too_long", "messages")
        max_tokens, stops = max_tokens_of(req), req.stop_list(config.max_stop_chars)
        if (req.min_tokens or 0) > max_tokens:
            raise ApiError(400, f"min_tokens is {req.min_tokens}, more than max_tokens ({max_tokens})",
                           "min_tokens_too_large", "min_tokens")
        call.question = asked.question
        try:
            with batcher.place() as submit:  # a full queue is refused before the image is decoded
                image = (await decode(asked.image_url)).image
                job = Job(image=image, question=asked.question, max_tokens=max_tokens,
                          temperature=req.temperature or 0.0, stop=stops, min_tokens=req.min_tokens or 0,
                          deadline=time.monotonic() + config.request_timeout_s, emit=call.emitter())
                submit(job)
        except QueueFull as exc:
            raise ApiError(503, f"server busy: {exc}; retry shortly", "queue_full",
                           headers={"retry-after": str(config.retry_after_s)}) from None
        call.attach(job, batcher, request.receive)
        first = await call.next_event()
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, first.code)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(call, model_name, include_usage), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return JSONResponse(await _collect(call, model_name))

    return app


async def _collect(call: Call, model_name: str) -> dict:
    """Wait for the whole answer (non-streaming)."""
    event = None
    while not isinstance(event, Finished | Failed):
        event = await call.next_event()
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message, event.code)
    call.audit(200, event.prompt_tokens, event.completion_tokens)
    return protocol.completion(call.id, model_name, event.text, event.finish_reason, event.prompt_tokens,
                               event.completion_tokens)


async def _stream(call: Call, model_name: str, include_usage: bool):
    """SSE chunks as OpenAI sends them: role, content deltas, finish reason, [usage], [DONE]."""
    yield _sse(protocol.chunk(call.id, model_name, {"role": "assistant", "content": ""}))
    while True:
        event = await call.next_event()
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


def serve(lm, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted (after checking the bind is safe)."""
    import uvicorn

    from tinymed.serve.security import check_bind

    check_bind(host, config.api_key)
    uvicorn.run(create_app(lm, config), host=host, port=port, log_level="info")
