"""What keeps other web sites out: Host allowlist, same-origin check, JSON-only bodies, page headers.

A server on loopback without a key is still reachable by every page the user's browser opens. Those pages
can send "simple" cross-origin requests without a preflight (a ``text/plain`` POST) and, by DNS rebinding,
make their own host name point at 127.0.0.1 and read the answers. :class:`GuardMiddleware` refuses:

* a request whose ``Host`` is not one of the allowed names (the loopback names, ``--host``,
  ``--allowed-host``): 400 ``host_not_allowed``. Rebinding sends the attacker's name, so it stops here;
* a request whose ``Origin`` is not the server's own (``scheme://`` + the ``Host`` it was sent to), or whose
  ``Sec-Fetch-Site`` says ``cross-site`` (a navigation to the page excepted): 403 ``origin_not_allowed``;
* a POST, PUT or PATCH whose ``Content-Type`` is not ``application/json``: 415. A browser cannot send JSON
  to another origin without a CORS preflight, which this server never answers.

Every response carries ``Content-Security-Policy`` (own origin only, ``frame-ancestors 'none'``),
``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.

It is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so streamed responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["LOOPBACK_NAMES", "SECURITY_HEADERS", "GuardMiddleware", "host_name", "is_loopback"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
"""Host names a loopback server always answers to."""

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
"""Headers added to every response."""

_BODY_METHODS = {"POST", "PUT", "PATCH"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_name(value: str) -> str:
    """The name of a ``Host`` header value, without its port and brackets, lowercased."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


class GuardMiddleware:
    """The checks above, in front of the app.

    Args:
        app: The ASGI app.
        allowed_hosts: Host names (no port) requests may be addressed to, besides the loopback names.
    """

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        names = {host_name(h) for h in (*LOOPBACK_NAMES, *allowed_hosts) if h}
        self.allowed_hosts = frozenset(n for n in names if n not in ("0.0.0.0", "::"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Refuse the request, or pass it on with the security headers added to its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is not None:
            await _refuse(send, *problem)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def check(self, scope: dict[str, Any]) -> tuple[int, str, str] | None:
        """Why the request is refused (status, code, message), or None."""
        headers: dict[str, list[str]] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        hosts = headers.get("host", [])
        if len(hosts) != 1 or host_name(hosts[0]) not in self.allowed_hosts:
            shown = hosts[0][:100] if hosts else "none"
            return 400, "host_not_allowed", f"Host {shown!r} is not served here (see --allowed-host)"
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        origin = headers.get("origin", [None])[-1]
        if origin is not None:
            scheme, _, rest = origin.partition("://")
            if scheme not in ("http", "https") or rest.lower() != hosts[0].strip().lower():
                return 403, "origin_not_allowed", f"requests from the origin {origin[:100]!r} are not allowed"
        site = headers.get("sec-fetch-site", [""])[-1].lower()
        navigation = method == "GET" and path == "/" and headers.get("sec-fetch-mode", [""])[-1] == "navigate"
        if site == "cross-site" and not navigation:
            return 403, "origin_not_allowed", "cross-site requests are not allowed"
        if method in _BODY_METHODS:
            media = headers.get("content-type", [""])[-1].partition(";")[0].strip().lower()
            if media != "application/json":
                shown = media or "none"
                return 415, "unsupported_media_type", f"the body must be application/json, not {shown}"
        return None


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
