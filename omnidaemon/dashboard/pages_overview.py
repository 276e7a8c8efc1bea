"""The overview (`/ui/`) and its live part (`/ui/live/overview`), which the page's script
fetches every two seconds and swaps in: no page reloads, and without script the page is
still whole (it only stops updating)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from omnidaemon.dashboard.overview import read_overview
from omnidaemon.dashboard.rates import RateHistory
from omnidaemon.dashboard.session import Viewer
from omnidaemon.dashboard.templating import page, served_app

__all__ = ["router"]

router = APIRouter()


def _history(request: Request) -> RateHistory:
    history: RateHistory = request.app.state.dashboard_rates
    return history


@router.get("", include_in_schema=False)
async def root() -> Response:
    """`/ui` is `/ui/`."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, user: Viewer) -> Response:
    """The bus, the workers and every agent at a glance."""
    app = served_app(request)
    data = await read_overview(app, _history(request))
    return page(request, "overview.html", user, title="Overview", overview=data)


@router.get("/live/overview", response_class=HTMLResponse)
async def overview_live(request: Request, user: Viewer) -> Response:
    """The overview's live part alone (what the page swaps in)."""
    app = served_app(request)
    data = await read_overview(app, _history(request))
    return page(request, "overview_live.html", user, overview=data)
