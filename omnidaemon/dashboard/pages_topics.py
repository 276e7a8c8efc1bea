"""Topics and agents: every topic on the bus (`/ui/topics`), one topic's entries, groups and
held deliveries (`/ui/topics/{topic}`), one agent's declaration, metrics and workers
(`/ui/agents/{agent}`). Read-only pages: nothing here changes the bus."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from redis.exceptions import RedisError

from omnidaemon.app import App
from omnidaemon.dashboard.session import UiUser, Viewer
from omnidaemon.dashboard.templating import page
from omnidaemon.dashboard.topics_view import (
    MAX_ENTRIES,
    READ_TIMEOUT,
    read_agent,
    read_topic,
    read_topics,
)
from omnidaemon.errors import BusUnavailable, NotFound

__all__ = ["router"]

router = APIRouter()

_DEFAULT_ENTRIES = 25
_MAX_NAME = 255  # longer than any topic or agent name: not looked up on the bus

# What a bus that fails or hangs raises (the JSON API answers these 503 too).
_BUS_FAILURES = (BusUnavailable, RedisError, OSError, TimeoutError)


def _app(request: Request) -> App:
    app: App = request.app.state.omnidaemon.app
    return app


def _not_found(request: Request, user: UiUser, message: str) -> Response:
    return page(request, "message.html", user, status=404, title="Not found", message=message)


def _bus_down(request: Request, user: UiUser, exc: Exception) -> Response:
    reason = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
    return page(
        request,
        "message.html",
        user,
        status=503,
        title="The bus does not answer",
        message=f"The bus did not answer within {READ_TIMEOUT:g} s ({reason}): retry shortly.",
    )


@router.get("/topics", response_class=HTMLResponse)
async def topics(request: Request, user: Viewer) -> Response:
    """Every topic on the bus with its entries, groups and dead letters."""
    try:
        found = await read_topics(_app(request))
    except _BUS_FAILURES as exc:
        return _bus_down(request, user, exc)
    return page(request, "topics.html", user, title="Topics", topics=found)


@router.get("/topics/{topic}", response_class=HTMLResponse)
async def topic(
    request: Request, user: Viewer, topic: str, limit: int = _DEFAULT_ENTRIES
) -> Response:
    """A topic's recent entries (newest first), its groups with their consumers, and the
    deliveries live workers hold."""
    if len(topic) > _MAX_NAME:
        return _not_found(request, user, "No such topic on the bus.")
    limit = min(max(limit, 1), MAX_ENTRIES)
    try:
        view = await read_topic(_app(request), topic, limit=limit)
    except NotFound:
        return _not_found(request, user, f"No topic {topic!r} on the bus.")
    except _BUS_FAILURES as exc:
        return _bus_down(request, user, exc)
    return page(
        request,
        "topic.html",
        user,
        title=f"Topic {topic}",
        view=view,
        limit=limit,
        max_entries=MAX_ENTRIES,
    )


@router.get("/agents/{agent}", response_class=HTMLResponse)
async def agent(request: Request, user: Viewer, agent: str) -> Response:
    """What the app declares about an agent, its fleet metrics, the live workers running
    it and the deliveries they hold."""
    app = _app(request)
    if len(agent) > _MAX_NAME:
        return _not_found(request, user, "No such agent.")
    try:
        view = await read_agent(app, agent)
    except NotFound:
        return _not_found(request, user, f"No agent {agent!r} in app {app.name!r} or on the bus.")
    except _BUS_FAILURES as exc:
        return _bus_down(request, user, exc)
    return page(request, "agent.html", user, title=f"Agent {agent}", view=view)
