"""The OpenAI chat-completions wire format: request validation and reply/chunk/error objects.

Departures from OpenAI, on purpose: `temperature` defaults to 0 (greedy: decision support should be
reproducible), one image per request (in any system or user message), images only as `data:` URLs (the
server fetches nothing), no multi-turn history (system + user text is folded into the one question the
model is asked), at most 4 stop strings of bounded length. Types are strict, as OpenAI's are:
`max_tokens: true` or `stream: "yes"` are refused, not coerced (an integer `temperature` is a number).
One extension, named as vLLM names it: `min_tokens` (the end-of-answer token is ignored until that many
tokens are out; benchmarks use it to time a fixed answer length).
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @classmethod
    def from_status(cls, status: int, message: str, headers: dict[str, str] | None = None) -> ApiError:
        """An error for a bare HTTP status (unknown route, wrong method): its code is the status phrase."""
        try:
            code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = None
        return cls(status, message, code, headers=headers)

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    """Wire objects: no coercion (`true` is not 1, `"yes"` is not true)."""

    model_config = ConfigDict(strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(Strict):
    include_usage: bool | None = False


MAX_STOPS = 4  # as OpenAI


class ChatRequest(Strict):
    """The fields tinymed honours, strictly typed (null means the default, as in OpenAI's schema); other
    OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")  # merged with Strict's

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(0.0, ge=0, le=2, allow_inf_nan=False)
    min_tokens: int | None = Field(0, ge=0, description="vLLM's extension: no end of answer before this many tokens")
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1, le=1, description="one choice per request")

    def stop_list(self, max_chars: int) -> list[str]:
        """The stop strings: at most `MAX_STOPS`, each 1..`max_chars` characters (bounds the work per token)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(s) <= max_chars for s in stops):
            raise ApiError(400, f"stop takes up to {MAX_STOPS} strings of 1 to {max_chars} characters",
                           "invalid_stop", "stop")
        return stops


class Conversation(BaseModel):
    """What the model is asked: one question and at most one image (a data URL)."""

    question: str
    image_url: str | None


def conversation(request: ChatRequest) -> Conversation:
    """Fold system and user messages into one question; collect the (single) image, whichever of them holds it."""
    texts, images = [], []
    for i, message in enumerate(request.messages):
        if message.role in ("assistant", "tool"):
            raise ApiError(400, f"messages[{i}] has role {message.role!r}: multi-turn conversations are not "
                                "supported; send one user message (optionally after a system message)",
                           "unsupported_role", f"messages[{i}].role")
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content or []
        texts += [p.text for p in parts if isinstance(p, TextPart) and p.text.strip()]
        images += [p.image_url.url for p in parts if isinstance(p, ImagePart)]
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
