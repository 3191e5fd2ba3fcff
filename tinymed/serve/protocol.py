"""The OpenAI chat-completions wire format: request validation and reply/chunk/error objects.

Departures from OpenAI, on purpose: `temperature` defaults to 0 (greedy: decision support should be
reproducible), one image per request, images only as `data:` URLs (the server fetches nothing),
no multi-turn history (system + user text is folded into the one question the model is asked).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields tinymed honours; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_stop", "stop")
        return stops


class Conversation(BaseModel):
    """What the model is asked: one question and at most one image (a data URL)."""

    question: str
    image_url: str | None


def conversation(request: ChatRequest) -> Conversation:
    """Fold system and user messages into one question; collect the (single) image."""
    texts, images = [], []
    for i, message in enumerate(request.messages):
        if message.role in ("assistant", "tool"):
            raise ApiError(400, f"messages[{i}] has role {message.role!r}: multi-turn conversations are not "
                                "supported; send one user message (optionally after a system message)",
                           "unsupported_role", f"messages[{i}].role")
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content or []
        texts += [p.text for p in parts if isinstance(p, TextPart) and p.text.strip()]
        images += [p.image_url.url for p in parts if isinstance(p, ImagePart) and message.role == "user"]
    if len(images) > 1:
        raise ApiError(400, f"{len(images)} images sent; one image per request", "too_many_images", "messages")
    question = "\n\n".join(t.strip() for t in texts)
    if not question:
        raise ApiError(400, "no question: the messages hold no text", "empty_question", "messages")
    return Conversation(question=question, image_url=images[0] if images else None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(request_id: str, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """A `chat.completion.chunk`; `delta=None` gives the final usage-only chunk (empty choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
