"""A concurrent OpenAI-compatible chat-completions client with explicit retries and an on-disk cache.

Any server speaking ``POST {base_url}/chat/completions`` works (OpenAI, Azure OpenAI's v1 endpoint,
vLLM, Ollama, llama.cpp server, ``tinymed serve``). The openai client's own retries are off
(``max_retries=0``): 429, 408, 409, 5xx, timeouts and connection errors are retried here with
exponential backoff and full jitter, honouring ``Retry-After`` / ``retry-after-ms``. Every reply is
appended (fsync'd) to a JSONL cache keyed by a hash of (model, messages, parameters), so a repeated
or interrupted run re-asks nothing it already has.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

import openai
from pydantic import BaseModel, Field

from tinymed.io import append_jsonl, read_jsonl

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class EndpointConfig(BaseModel):
    """Where and how to ask: an OpenAI-compatible endpoint and the request policy (seconds)."""

    base_url: str
    model: str
    api_key: str | None = Field(default=None, description="None: servers that need no key get a dummy one")
    concurrency: int = Field(default=8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(default=120.0, gt=0, description="per request, whole reply")
    max_attempts: int = Field(default=5, ge=1, description="tries per request, first included")
    backoff_base_s: float = Field(default=1.0, ge=0, description="backoff before retry n is up to base*2^n")
    backoff_max_s: float = Field(default=60.0, ge=0, description="cap on any wait, Retry-After included")
    temperature: float = 0.0
    max_tokens: int | None = None


class Usage(BaseModel):
    """Token counts as the server reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens


class Completion(BaseModel):
    """One reply; `cached` when it came from the cache rather than the server."""

    text: str
    key: str
    cached: bool
    usage: Usage


class ClientStats(BaseModel):
    """What a client did: HTTP requests sent (retries included), cache hits, token usage."""

    requests: int = 0
    retries: int = 0
    cached: int = 0
    failed: int = 0
    usage: Usage = Field(default_factory=Usage, description="tokens of the requests sent in this run")
    usage_cached: Usage = Field(default_factory=Usage, description="tokens of the replies reused from cache")


class RequestFailed(RuntimeError):
    """A request that could not be answered (non-retryable error, or out of attempts)."""


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """SHA-256 hex of the canonical JSON of (model, messages, parameters)."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Replies by key, loaded from and appended to a JSONL file (in memory only when path is None)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        rows = read_jsonl(self.path) if self.path and self.path.exists() else []
        self._rows = {row["key"]: row for row in rows if "key" in row and "reply" in row}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def put(self, key: str, model: str, reply: str, usage: Usage) -> None:
        row = {"key": key, "model": model, "reply": reply, "usage": usage.model_dump(), "time": time.time()}
        self._rows[key] = row
        if self.path:
            append_jsonl(self.path, row)


def retry_after_s(headers) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, or Retry-After seconds or HTTP date)."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _retry_delay(exc: Exception) -> tuple[bool, float | None]:
    """(retryable?, server-requested wait) for an exception raised by a request."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS, retry_after_s(exc.response.headers)
    if isinstance(exc, (openai.APIConnectionError, TimeoutError)):  # APITimeoutError is a connection error
        return True, None
    return False, None


def _describe(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class ChatClient:
    """Async chat-completions with a concurrency limit, retries and a cache. Use ``async with``."""

    def __init__(
        self,
        config: EndpointConfig,
        cache: ResponseCache | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ):
        self.config = config
        self.cache = cache if cache is not None else ResponseCache(None)
        self.stats = ClientStats()
        self._sleep = sleep
        self._jitter = jitter
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> ChatClient:
        self._client = openai.AsyncOpenAI(
            base_url=self.config.base_url,
            api_key=self.config.api_key or "not-needed",
            max_retries=0,
            timeout=self.config.timeout_s,
        )
        self._slots = asyncio.Semaphore(self.config.concurrency)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._client.close()

    def params(self, **overrides) -> dict:
        """The request parameters that, with model and messages, define a reply."""
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens, **overrides}
        return {k: v for k, v in params.items() if v is not None}

    async def complete(self, messages: list[dict], *, variant: int = 0, **overrides) -> Completion:
        """The reply to `messages`, from the cache or the server.

        `variant` > 0 asks again for a fresh reply (a different cache entry); it is not sent.
        Raises RequestFailed when the server cannot answer.
        """
        params = self.params(**overrides)
        key = cache_key(self.config.model, messages, {**params, **({"variant": variant} if variant else {})})
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cached += 1
            usage = Usage(**hit.get("usage", {}))
            self.stats.usage_cached.add(usage)
            return Completion(text=hit["reply"], key=key, cached=True, usage=usage)
        text, usage = await self._request_with_retries(messages, params)
        self.cache.put(key, self.config.model, text, usage)
        return Completion(text=text, key=key, cached=False, usage=usage)

    async def _request_with_retries(self, messages: list[dict], params: dict) -> tuple[str, Usage]:
        for attempt in range(self.config.max_attempts):
            try:
                return await self._request(messages, params)
            except RequestFailed:
                self.stats.failed += 1
                raise
            except (openai.OpenAIError, TimeoutError) as exc:
                retryable, requested = _retry_delay(exc)
                if not retryable or attempt + 1 == self.config.max_attempts:
                    self.stats.failed += 1
                    raise RequestFailed(f"{_describe(exc)} (after {attempt + 1} attempt(s))") from exc
                self.stats.retries += 1
                await self._sleep(self._backoff_s(attempt, requested))
        raise AssertionError("unreachable")

    def _backoff_s(self, attempt: int, requested: float | None) -> float:
        if requested is not None:
            return min(requested, self.config.backoff_max_s)
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return ceiling * self._jitter()

    async def _request(self, messages: list[dict], params: dict) -> tuple[str, Usage]:
        async with self._slots:
            self.stats.requests += 1
            async with asyncio.timeout(self.config.timeout_s):
                response = await self._client.chat.completions.create(
                    model=self.config.model, messages=messages, **params
                )
        self.stats.usage.add(usage := Usage(**(response.usage.model_dump() if response.usage else {})))
        text = response.choices[0].message.content if response.choices else None
        if text is None:
            raise RequestFailed("the server sent no message content")
        return text.strip(), usage
