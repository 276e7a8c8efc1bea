"""Around every request: a cap on the body's size, JSON bodies only, loopback `Host` names and
clients only when there is no authentication, headers that keep answers out of caches, and
one log line (method, path, status, duration, token name; never a header's value)."""

import ipaddress
import re
import time
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnidaemon.api.auth import is_loopback
from omnidaemon.api.errors import error_response
from omnidaemon.observability.logging import get_logger

__all__ = ["RequestGuard", "TOKEN_NAME_KEY"]

TOKEN_NAME_KEY = "omnidaemon_token"
"""Where the auth check leaves the name of the request's token, in `request.state`."""

_log = get_logger("omnidaemon.api")


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FORM = "application/x-www-form-urlencoded"
_DASHBOARD = "/ui/"


class RequestGuard:
    """ASGI middleware: refuses bodies over `max_body` bytes (413) and bodies that are not
    declared JSON (415), marks answers `Cache-Control: no-store`, and logs each request.

    The cap is checked against `Content-Length` before the body is read, and against the
    bytes received for a body sent without one: a client cannot make the server buffer an
    unbounded body, authenticated or not. Requiring `Content-Type: application/json` means a
    web page cannot make a browser send a request without a CORS preflight.

    Args:
        app: The application.
        max_body: The largest request body accepted, in bytes.
        loopback_only: Answer only requests from a loopback client address whose `Host` is a
            loopback name (403 otherwise). For a server without authentication: a web page
            whose name resolves to 127.0.0.1 (DNS rebinding) would otherwise reach it as its
            own origin, and a client elsewhere (the server bound to a public address, or
            behind a proxy that reports the client's address) would reach it at all. A
            request without a client address is answered only on a Unix socket.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, loopback_only: bool = False) -> None:
        self.app = app
        self.max_body = max_body
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        answered = False  # a 413 went out: what the app sends after it is dropped

        async def send_guarded(message: Message) -> None:
            nonlocal status
            if answered:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.setdefault("cache-control", "no-store")
                headers.setdefault("x-content-type-options", "nosniff")
            await send(message)

        async def refuse() -> None:
            nonlocal answered
            response = error_response(
                413,
                "payload_too_large",
                f"the request body is over {self.max_body:,} bytes",
            )
            await response(scope, receive, send_guarded)
            answered = True

        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request" and not answered:
                received += len(message.get("body", b""))
                if received > self.max_body:
                    await refuse()
                    # The app stops reading as if the client had gone; its answer is dropped.
                    return {"type": "http.disconnect"}
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_guarded)
            elif (_int_header(scope, b"content-length") or 0) > self.max_body:
                await refuse()
            else:
                await self.app(scope, receive_capped, send_guarded)
        finally:
            state: dict[str, Any] = scope.get("state") or {}
            client = scope.get("client")
            _log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=413 if answered else status,
                ms=round((time.perf_counter() - started) * 1000, 1),
                token=state.get(TOKEN_NAME_KEY),
                client=client[0] if client else None,
            )

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        """The answer to a request refused before the application sees it, or `None`."""
        if self.loopback_only:
            client = _remote_client(scope)
            if client is not None:
                return error_response(
                    403,
                    "forbidden",
                    f"this server runs without authentication and answers only to clients on "
                    f"this machine, not to {client}",
                )
            host = _header_text(scope, b"host")
            if not is_loopback(_host_name(host) or ""):
                return error_response(
                    403,
                    "forbidden",
                    f"this server runs without authentication and answers only to "
                    f"localhost, not to Host {host!r}",
                )
        has_body = (_int_header(scope, b"content-length") or 0) > 0 or bool(
            _header_text(scope, b"transfer-encoding")
        )
        if scope["method"] in _BODY_METHODS and has_body:
            content_type = _header_text(scope, b"content-type").split(";")[0].strip().lower()
            # The dashboard's forms post as forms; each carries a CSRF token and must come
            # from the dashboard's own origin (omnidaemon.dashboard.session).
            form = content_type == _FORM and scope["path"].startswith(_DASHBOARD)
            if (
                content_type != "application/json"
                and not content_type.endswith("+json")
                and not form
            ):
                return error_response(
                    415,
                    "unsupported_media_type",
                    "send the body as JSON, with 'Content-Type: application/json'",
                )
        return None


def _header_text(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def _int_header(scope: Scope, name: bytes) -> int | None:
    try:
        return int(_header_text(scope, name))
    except ValueError:
        return None


# RFC 9110's `Host`: uri-host [":" port], where uri-host is a name, an IPv4 address, or an IPv6
# address in brackets. Names are limited to what DNS names hold (RFC 3986 allows more, but
# nothing else can be a loopback name); nothing may follow, so `[::1]evil.com` or
# `[::1]@evil.com` are no hosts at all rather than `::1` with trailing text.
_HOST_RE = re.compile(
    r"(?:(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])"
    r"(?::[0-9]{1,5})?"
)


def _host_name(host: str) -> str | None:
    """The name in a `Host` header, without its port (`[::1]:8765` -> `::1`); `None` unless
    the whole header is a host with an optional port."""
    found = _HOST_RE.fullmatch(host)
    if found is None:
        return None
    if found["ipv6"] is not None:
        try:
            return str(ipaddress.IPv6Address(found["ipv6"]))
        except ValueError:
            return None  # `[127.0.0.1]` or `[::1::]`: brackets hold IPv6 addresses only
    return found["name"]


def _remote_client(scope: Scope) -> str | None:
    """The request's client, described, if it may not be on this machine; `None` if it is.

    A client address must be a loopback address. A request without one (an ASGI server on a
    Unix socket, or a test transport) is taken as local only on a Unix socket: the server's
    address then has no port. Otherwise nothing says where it came from, so it is refused.
    """
    client = scope.get("client")
    if client is None:
        server = scope.get("server")
        if server is not None and server[1] is None:
            return None
        return "a client of unknown address"
    try:
        if ipaddress.ip_address(client[0]).is_loopback:
            return None
    except ValueError:
        pass
    return f"client {client[0]}"
