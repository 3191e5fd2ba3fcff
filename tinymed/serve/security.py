"""Safe defaults: loopback unless an API key is set, and a constant-time bearer-key check."""

from __future__ import annotations

import hmac
import ipaddress


class UnsafeBindError(ValueError):
    """Binding beyond loopback without an API key."""


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise UnsafeBindError(
            f"binding to {host} exposes the server beyond this machine: set an API key "
            "(--api-key or env TINYMED_API_KEY) or bind to 127.0.0.1"
        )


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization: Bearer KEY` header carries `api_key` (compared in constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(presented.encode(), api_key.encode())
