"""ASGI middleware of `tinymed serve` (plain ASGI, not Starlette's `BaseHTTPMiddleware`, which hides a
client's disconnect from the app): security headers, the body-size limit, the loopback guard of a
server without an API key, and giving freed memory back when the server falls idle."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse

from tinymed.serve.protocol import ApiError
from tinymed.serve.security import is_loopback

SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """A request body over `max_bytes` gets 413, whether announced or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> ApiError:
        return ApiError(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large",
                        headers={"connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self._error())(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, counted, send)


def _names_loopback(authority_or_url: str) -> bool:
    """Whether a Host value (`name[:port]`) or an Origin (`scheme://name[:port]`) names this machine."""
    try:
        host = urlsplit(authority_or_url if "://" in authority_or_url else "//" + authority_or_url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback(host)


class LoopbackOnly:
    """For a server without an API key (which may bind only to loopback): the Host header must name this
    machine, and an Origin, when sent, too. A web page elsewhere then cannot use the API from the user's
    browser, neither cross-site (its Origin) nor by DNS rebinding (its Host). With a key, this is not
    needed (a page cannot know the key) and a LAN bind answers to any host name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if not _names_loopback(headers.get("host", "")):
            error = ApiError(403, "the Host header must name this machine (localhost, 127.0.0.1 or [::1]) on a "
                                  "server without an API key; set an API key to serve under another name",
                             "host_not_allowed")
        elif origin is not None and not _names_loopback(origin):
            error = ApiError(403, "requests from web pages of other origins are refused on a server without an "
                                  "API key", "origin_not_allowed")
        else:
            return await self.app(scope, receive, send)
        await error_response(error)(scope, receive, send)


class ReleaseMemoryWhenIdle:
    """When the last request in flight has ended, `release()` (hand freed memory back to the OS: see
    `tinymed.serve.memory`)."""

    def __init__(self, app, release: Callable[[], None]):
        self.app, self.release = app, release
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.release()
