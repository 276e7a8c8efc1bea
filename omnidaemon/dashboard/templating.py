"""Rendering the dashboard's pages: Jinja2 templates shipped in the package, escaped.

Every value is HTML-escaped unless a template says otherwise (`autoescape`): payloads,
errors and names come from the bus and may hold anything. Pages carry a Content Security
Policy that allows only this server's own script and styles (no inline script), so markup
that slipped through could still run nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from omnidaemon import __version__
from omnidaemon.dashboard.session import UiUser

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["CSP", "ago", "duration", "not_found", "page", "render_text", "served_app"]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""The pages' Content Security Policy."""


def duration(seconds: float | None) -> str:
    """`seconds` for people: `850 ms`, `12.5 s`, `4 min 10 s`, `3 h 5 min`."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def ago(when: datetime | float | None) -> str:
    """How long ago `when` (a datetime, or Unix seconds) was."""
    if when is None:
        return "—"
    stamp = when.timestamp() if isinstance(when, datetime) else when
    return duration(max(0.0, datetime.now(UTC).timestamp() - stamp)) + " ago"


_env = Environment(
    loader=PackageLoader("omnidaemon.dashboard", "templates"),
    autoescape=select_autoescape(["html", "svg"], default=True),
    undefined=StrictUndefined,  # a misspelt name is an error in tests, not an empty cell
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["duration"] = duration
_env.filters["ago"] = ago
_env.globals["version"] = __version__


def render_text(name: str, context: Mapping[str, Any]) -> str:
    """Template `name` rendered with `context`."""
    return _env.get_template(name).render(**context)


def page(
    request: Request,
    name: str,
    user: UiUser | None,
    *,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Template `name` as an HTML response, with what every page knows: the user, their CSRF
    token, the app's name, and the current path (for the navigation)."""
    state = request.app.state.omnidaemon
    body = render_text(
        name,
        {
            "user": user,
            "csrf": user.csrf if user is not None else "",
            "app_name": state.app.name,
            "path": request.url.path,
            **context,
        },
    )
    return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": CSP})


def not_found(request: Request, user: UiUser | None, message: str) -> HTMLResponse:
    """The 404 page of something missing (an unknown topic, agent, run), saying what."""
    return page(request, "message.html", user, status=404, title="Not found", message=message)


def served_app(request: Request) -> App:
    """The app the dashboard serves (connected by the API's lifespan)."""
    app: App = request.app.state.omnidaemon.app
    return app
