"""Topics and agents: every topic on the bus (`/ui/topics`), one topic's entries, groups and
held deliveries (`/ui/topics/{topic}`), one agent's declaration, metrics and workers
(`/ui/agents/{agent}`). Read-only pages: nothing here changes the bus."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from omnidaemon.dashboard.session import Viewer
from omnidaemon.dashboard.templating import not_found, page, served_app
from omnidaemon.dashboard.topics_view import MAX_ENTRIES, read_agent, read_topic, read_topics
from omnidaemon.errors import NotFound

__all__ = ["router"]

router = APIRouter()

_DEFAULT_ENTRIES = 25
_MAX_NAME = 255  # longer than any topic or agent name: not looked up on the bus


@router.get("/topics", response_class=HTMLResponse)
async def topics(request: Request, user: Viewer) -> Response:
    """Every topic on the bus with its entries, groups and dead letters."""
    found = await read_topics(served_app(request))
    return page(request, "topics.html", user, title="Topics", topics=found)


@router.get("/topics/{topic}", response_class=HTMLResponse)
async def topic(
    request: Request, user: Viewer, topic: str, limit: int = _DEFAULT_ENTRIES
) -> Response:
    """A topic's recent entries (newest first), its groups with their consumers, and the
    deliveries live workers hold."""
    if len(topic) > _MAX_NAME:
        return not_found(request, user, "No such topic on the bus.")
    limit = min(max(limit, 1), MAX_ENTRIES)
    try:
        view = await read_topic(served_app(request), topic, limit=limit)
    except NotFound:
        return not_found(request, user, f"No topic {topic!r} on the bus.")
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
    app = served_app(request)
    if len(agent) > _MAX_NAME:
        return not_found(request, user, "No such agent.")
    try:
        view = await read_agent(app, agent)
    except NotFound:
        return not_found(request, user, f"No agent {agent!r} in app {app.name!r} or on the bus.")
    return page(request, "agent.html", user, title=f"Agent {agent}", view=view)
