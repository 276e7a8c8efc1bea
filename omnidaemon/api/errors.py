"""Errors as JSON: every failure answers `{"code": ..., "message": ...}` with the right status,
and never a traceback (that goes to the server's log, for unexpected errors only)."""

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import MaxConnectionsError, RedisError
from starlette.exceptions import HTTPException

from omnidaemon._json_limits import MAX_NESTING
from omnidaemon.api.models import ErrorResponse
from omnidaemon.errors import (
    BusUnavailable,
    DelayTooLong,
    NotFound,
    OmniDaemonError,
    PayloadTooLarge,
    PayloadValidationError,
)
from omnidaemon.observability.logging import get_logger

__all__ = ["ApiError", "documented", "error_response", "install_error_handlers"]

_log = get_logger("omnidaemon.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An error a route or the auth check answers with.

    Args:
        status: The HTTP status.
        code: A short machine-readable code (`not_found`, `timeout`, ...).
        message: One line saying what is wrong and, where it helps, what to do.
        headers: Extra response headers (`WWW-Authenticate`).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response: `{"code", "message"}`, and `details` when given."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _one_line(text: str) -> str:
    first = text.strip().splitlines()
    return first[0] if first else ""


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            # The body is not JSON at all: a 400, unlike a well-formed body with bad fields.
            reason = error.get("ctx", {}).get("error", "")
            return error_response(
                400, "invalid_json", f"the request body is not valid JSON ({reason})"
            )
    details = [
        {
            "location": _location(e.get("loc", ())),
            # pydantic prefixes the message of a validator's ValueError with its class.
            "message": str(e.get("msg", "")).removeprefix("Value error, "),
        }
        for e in errors
    ]
    summary = "; ".join(f"{d['location']}: {d['message']}" for d in details[:5])
    return error_response(422, "invalid_request", summary or "invalid request", details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, RecursionError):
        # Python's `json` module gave up on a body nested ~1000 levels deep (FastAPI answers
        # any such failure with a 400 "error parsing the body"): the body is JSON, and too
        # deep, like one that nests only past `MAX_NESTING`.
        return error_response(
            422,
            "invalid_request",
            f"body: arrays and objects are nested too deep to read (a payload may nest at most "
            f"{MAX_NESTING} levels)",
        )
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path} (see /docs)"
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, "not_found", str(exc))


async def _invalid_payload(request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "invalid_payload", _one_line(str(exc)))


async def _delay_too_long(request: Request, exc: Exception) -> JSONResponse:
    # The bound is the server's setting, not the model's: it is checked where every publish is.
    return error_response(422, "invalid_request", f"body.delay: {exc}")


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    return error_response(413, "payload_too_large", str(exc))


async def _bus_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Connection failures name the bus's host and port at most, never a password.
    detail = _one_line(str(exc)) or type(exc).__name__
    if not isinstance(exc, BusUnavailable):
        detail = f"the bus failed: {type(exc).__name__}: {detail}"
    return error_response(503, "bus_unavailable", detail, headers={"Retry-After": "5"})


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    # Every connection of the pool is in use: the bus is fine, this server is busy.
    return error_response(
        503,
        "busy",
        "every connection of this server to the bus is in use; retry shortly",
        headers={"Retry-After": "1"},
    )


async def _omnidaemon_error(request: Request, exc: Exception) -> JSONResponse:
    # Errors omnidaemon raises on purpose say what is wrong in words fit for the caller.
    _log.warning("request failed", path=request.url.path, error=type(exc).__name__)
    return error_response(500, "internal_error", _one_line(str(exc)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug: the caller learns only that it happened. The server logs the traceback itself
    # (Starlette re-raises the exception to it after this answer).
    return error_response(500, "internal_error", "internal error (see the server's log)")


BUS_FAILURES: tuple[type[Exception], ...] = (
    BusUnavailable,
    MaxConnectionsError,
    RedisError,
    OSError,
)
"""What a bus that fails, does not answer, or has no connection free raises (answered 503)."""


def install_error_handlers(api: FastAPI) -> None:
    """Answer every error of `api` as JSON (`ErrorResponse`)."""
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(NotFound, _not_found)
    api.add_exception_handler(PayloadValidationError, _invalid_payload)
    api.add_exception_handler(PayloadTooLarge, _too_large)
    api.add_exception_handler(DelayTooLong, _delay_too_long)
    for failure in BUS_FAILURES:
        handler = _pool_exhausted if failure is MaxConnectionsError else _bus_unavailable
        api.add_exception_handler(failure, handler)
    api.add_exception_handler(OmniDaemonError, _omnidaemon_error)
    api.add_exception_handler(Exception, _unexpected)


_DESCRIPTIONS = {
    400: "The body is not JSON.",
    401: "No token, or not a known one.",
    403: "The token lacks the scope this needs.",
    404: "The topic, agent, event or dead letter is not on the bus.",
    413: "The body or the event is too large.",
    409: "The request's event was cancelled (`omnidaemon cancel`) before its agent finished.",
    415: "The body is not sent as JSON (`Content-Type: application/json`).",
    422: "The request does not validate, or the payload does not match the agents' type.",
    502: "The agent gave up on the request (it was dead-lettered).",
    503: "The bus cannot be reached, or the server is busy: retry after `Retry-After` seconds.",
    504: "No answer within the timeout.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that may answer these error statuses (with
    `ErrorResponse`), for the OpenAPI schema."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in statuses
    }
