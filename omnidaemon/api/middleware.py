"""Around every request: a cap on the body's size, JSON bodies only, loopback `Host` names
only when there is no authentication, headers that keep answers out of caches, and one log
line (method, path, status, duration, token name; never a header's value)."""

import time
from typing import Any

import structlog
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnidaemon.api.auth import is_loopback
from omnidaemon.api.errors import error_response

__all__ = ["RequestGuard", "TOKEN_NAME_KEY"]

TOKEN_NAME_KEY = "omnidaemon_token"
"""Where the auth check leaves the name of the request's token, in `request.state`."""

_log = structlog.get_logger("omnidaemon.api")


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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
        loopback_only: Answer only requests whose `Host` is a loopback name (403 otherwise).
            For a server without authentication: a web page whose name resolves to 127.0.0.1
            (DNS rebinding) would otherwise reach it as its own origin.
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
            host = _host_name(_header_text(scope, b"host"))
            if not is_loopback(host):
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
            if content_type != "application/json" and not content_type.endswith("+json"):
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


def _host_name(host: str) -> str:
    """The name in a `Host` header, without its port (`[::1]:8765` -> `::1`)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
