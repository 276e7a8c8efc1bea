"""The Graph page (`/ui/graph`): the app's topics, agents and schedules with the edges
between them, drawn as server-rendered SVG (`omnidaemon.dashboard.graph` lays it out), and
the same as a table for keyboards, screen readers and small screens."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from omnidaemon.dashboard.graph import draw, topic_rows
from omnidaemon.dashboard.session import Viewer
from omnidaemon.dashboard.templating import page, served_app

__all__ = ["router"]

router = APIRouter()


@router.get("/graph", response_class=HTMLResponse)
async def graph(request: Request, user: Viewer) -> Response:
    """The app's topology, as its agents' declarations describe it (`App.topology()`, which
    `omnidaemon graph` prints as Mermaid or DOT)."""
    topology = served_app(request).topology()
    drawing = draw(topology)
    return page(
        request,
        "graph.html",
        user,
        title="Graph",
        drawing=drawing,
        rows=topic_rows(topology),
        back_edges=sum(1 for line in drawing.lines if line.back),
    )
