"""The web dashboard at `/ui`: the fleet, the graph, topics and agents, dead letters and runs.

Served by `omnidaemon api` (and `omnidaemon dashboard`) beside the JSON API, on the same
control-plane code and the same tokens (`omnidaemon.dashboard.session`). Pages are rendered
on the server (Jinja2, escaped) with one small script of our own (`static/ui.js`) for the
live parts: no third-party front end, no CDN, nothing to build; it works offline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from inspect import isawaitable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from omnidaemon.api.errors import BUS_FAILURES
from omnidaemon.dashboard import (
    pages_dead_letters,
    pages_graph,
    pages_overview,
    pages_runs,
    pages_session,
    pages_topics,
)
from omnidaemon.dashboard.rates import RateHistory
from omnidaemon.dashboard.session import ActionRefused, SignInRequired, signed_in
from omnidaemon.dashboard.templating import page

__all__ = ["PREFIX", "install_dashboard"]

PREFIX = "/ui"
"""Where the dashboard is served."""

_STATIC = Path(__file__).parent / "static"

_Handler = Callable[[Request, Exception], Response | Awaitable[Response]]


async def _sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    if exc.fragment:
        return Response(status_code=401, headers={"X-Omnidaemon-Signin": "required"})
    return RedirectResponse(
        f"{PREFIX}/login?next={_quote(exc.next_path)}",
        status_code=303,
    )


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ActionRefused)
    return page(
        request,
        "message.html",
        signed_in(request),
        status=exc.status,
        title="Not allowed" if exc.status == 403 else "Not done",
        message=exc.message,
    )


def _on_pages(api_handler: _Handler, page_handler: _Handler) -> _Handler:
    """A handler answering with `page_handler` under `/ui/`, and as the API did elsewhere."""

    async def handle(request: Request, exc: Exception) -> Response:
        chosen = page_handler if request.url.path.startswith(f"{PREFIX}/") else api_handler
        answer = chosen(request, exc)
        return await answer if isawaitable(answer) else answer

    return handle


def _bus_failed(request: Request, exc: Exception) -> Response:
    """A bus that fails or does not answer: a page saying so (503)."""
    reason = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
    return page(
        request,
        "message.html",
        signed_in(request),
        status=503,
        title="The bus does not answer",
        message=f"The bus failed ({reason}): retry shortly.",
    )


def _bad_request(request: Request, exc: Exception) -> Response:
    """A page's query or path value it cannot take (`?limit=abc`): a page saying which (400),
    not the API's JSON."""
    assert isinstance(exc, RequestValidationError)
    problems = [
        f"{e.get('loc', ('request',))[-1]}: {str(e.get('msg', '')).removeprefix('Value error, ')}"
        for e in exc.errors()[:5]
    ]
    return page(
        request,
        "message.html",
        signed_in(request),
        status=400,
        title="Bad request",
        message="This page cannot take " + ("; ".join(problems) or "that request") + ".",
    )


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def install_dashboard(api: FastAPI) -> None:
    """Serve the dashboard from `api` (made by `create_api`) at `/ui`."""
    api.state.dashboard_rates = RateHistory()
    api.add_exception_handler(SignInRequired, _sign_in)
    api.add_exception_handler(ActionRefused, _refused)
    # The API's handlers of these are installed already: they still answer outside `/ui/`.
    for failure in BUS_FAILURES:  # the API answers them 503 in JSON; pages answer a page
        api.add_exception_handler(failure, _on_pages(api.exception_handlers[failure], _bus_failed))
    api.add_exception_handler(
        RequestValidationError,
        _on_pages(api.exception_handlers[RequestValidationError], _bad_request),
    )
    api.mount(f"{PREFIX}/static", StaticFiles(directory=_STATIC), name="dashboard-static")
    for module in (
        pages_session,
        pages_overview,
        pages_graph,
        pages_topics,
        pages_dead_letters,
        pages_runs,
    ):
        api.include_router(module.router, prefix=PREFIX, include_in_schema=False)
