"""Runs (`/ui/runs`), a run's trace as a timeline (`/ui/runs/{id}`), and an event's streamed
output as it comes (`/ui/events/{id}`, its Server-Sent Events at `/ui/events/{id}/stream`).

Read with what `omnidaemon runs`, `omnidaemon trace` and `omnidaemon result` use (`App.runs`,
`App.trace`, `event_results`) and the SSE code of `GET /v1/events/{id}/stream`; the live
parts are fragments the page's script swaps in, and the stream an `EventSource`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from omnidaemon.api.dependencies import Waiting
from omnidaemon.api.routes.streams import stream_response
from omnidaemon.dashboard.session import Viewer
from omnidaemon.dashboard.templating import not_found, page, served_app
from omnidaemon.dashboard.timeline import SCALE, find_event, lay_out
from omnidaemon.results import event_results
from omnidaemon.traces import RunStatus

__all__ = ["router"]

router = APIRouter()

SINCE: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
}
"""The runs list's choices of how far back to look."""

STATUSES: tuple[RunStatus, ...] = ("running", "succeeded", "failed", "cancelled")
_LIMIT = 100  # runs on one page
_OVER = ("succeeded", "dead_lettered", "rejected", "cancelled")  # handlings that stream no more
_STREAM_WAIT = 30.0  # seconds the stream waits for output to start, and then for each next

IdPath = Annotated[str, Path(min_length=1, max_length=200)]
Choice = Annotated[str | None, Query(max_length=20)]


def _filters(since: str | None, status: str | None) -> tuple[str, RunStatus | None]:
    """The list's filters; a value the form does not offer is read as its default."""
    chosen = since if since in SINCE else "1h"
    wanted = next((s for s in STATUSES if s == status), None)
    return chosen, wanted


async def _runs_context(request: Request, since: str | None, status: str | None) -> dict[str, Any]:
    chosen, wanted = _filters(since, status)
    runs = await served_app(request).runs(since=SINCE[chosen], status=wanted, limit=_LIMIT)
    query = f"since={chosen}" + (f"&status={wanted}" if wanted else "")
    return {
        "runs": runs,
        "since": chosen,
        "shown_status": wanted or "any",
        "since_choices": list(SINCE),
        "status_choices": ["any", *STATUSES],
        "query": query,
        "limit": _LIMIT,
        "read_at": datetime.now(UTC),
    }


@router.get("/runs", response_class=HTMLResponse)
async def runs(
    request: Request,
    user: Viewer,
    since: Choice = None,
    status: Choice = None,
    id: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Recent runs with their status, filtered by age and status; `?id=` opens a run by its
    id or the id of any of its events."""
    if id and id.strip():
        return RedirectResponse(f"/ui/runs/{quote(id.strip(), safe='')}", status_code=303)
    context = await _runs_context(request, since, status)
    return page(request, "runs.html", user, title="Runs", **context)


@router.get("/live/runs", response_class=HTMLResponse)
async def runs_live(
    request: Request, user: Viewer, since: Choice = None, status: Choice = None
) -> Response:
    """The runs list alone (what the page swaps in)."""
    context = await _runs_context(request, since, status)
    return page(request, "runs_live.html", user, **context)


async def _run_context(request: Request, any_id: str) -> dict[str, Any] | None:
    trace = await served_app(request).trace(any_id)
    if trace is None:
        return None
    now = datetime.now(UTC)
    return {
        "trace": trace,
        "asked": any_id,
        "timeline": lay_out(trace, now),
        "scale": SCALE,
        "read_at": now,
    }


def _no_trace(any_id: str) -> str:
    return (
        f"No trace of {any_id!r}: an unknown id, an event no worker has started yet, or a run "
        "whose trace expired (OMNIDAEMON_TRACE_TTL)."
    )


# `:path`: a run id is a correlation id, which the publisher chooses (`order/7` holds a `/`).
@router.get("/runs/{run_id:path}", response_class=HTMLResponse)
async def run(request: Request, user: Viewer, run_id: IdPath) -> Response:
    """A run's trace as a timeline: every event, each agent's handling and every attempt."""
    context = await _run_context(request, run_id)
    if context is None:
        return not_found(request, user, _no_trace(run_id))
    return page(request, "run.html", user, title=f"Run {run_id}", **context)


@router.get("/live/runs/{run_id:path}", response_class=HTMLResponse)
async def run_live(request: Request, user: Viewer, run_id: IdPath) -> Response:
    """A run's timeline alone (what the page swaps in while the run goes on)."""
    context = await _run_context(request, run_id)
    if context is None:
        return PlainTextResponse(_no_trace(run_id), status_code=404)
    return page(request, "run_live.html", user, **context)


@router.get("/events/{event_id}", response_class=HTMLResponse)
async def event(
    request: Request,
    user: Viewer,
    event_id: IdPath,
    agent: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """An event: its stored results, its place in its run, and its streamed output live."""
    app = served_app(request)
    results = [r for r in await event_results(app, event_id) if r.status != "pending"]
    trace = await app.trace(event_id)
    node = find_event(trace, event_id) if trace is not None else None
    topic = node.topic if node is not None else None
    if not results and node is None:
        from omnidaemon.progress import event_progress

        # Neither a result nor a trace yet: the bus may still hold it, waiting for a worker.
        progress = await event_progress(app.broker, event_id)
        if progress.topic is None:
            return not_found(
                request,
                user,
                f"No event {event_id!r} on the bus: an unknown id, or one whose results and "
                "trace expired.",
            )
        topic = progress.topic
    # Output of an event whose handlings are over is all stored: no point waiting long for
    # it (a waiting stream holds one of the server's waiting slots).
    over = (
        node is not None and bool(node.handlings) and all(h.status in _OVER for h in node.handlings)
    )
    query = {"agent": agent} if agent else {}
    if over:
        query["timeout"] = "2"
    stream_url = f"/ui/events/{quote(event_id, safe='')}/stream"
    return page(
        request,
        "event.html",
        user,
        title=f"Event {event_id}",
        event_id=event_id,
        topic=topic,
        agent=agent,
        results=results,
        trace=trace,
        node=node,
        stream_url=stream_url + (f"?{urlencode(query)}" if query else ""),
    )


@router.get("/events/{event_id}/stream")
async def event_stream(
    request: Request,
    user: Viewer,
    waiting: Waiting,
    event_id: IdPath,
    agent: Annotated[str | None, Query(max_length=200)] = None,
    timeout: Annotated[float, Query(gt=0, le=300)] = _STREAM_WAIT,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=200)] = None,
) -> Response:
    """The event's streamed output as Server-Sent Events, as `GET /v1/events/{id}/stream`
    sends them (signed in by the dashboard's cookie instead of a bearer token): 404 when
    nothing was streamed within `timeout`, 204 when resumed after the end."""
    app = served_app(request)
    response = await stream_response(
        app, waiting, request, event_id, agent=agent, timeout=timeout, after=last_event_id
    )
    if response is None:
        return PlainTextResponse(
            f"nothing was streamed for event {event_id!r} within {timeout:g} s",
            status_code=404,
        )
    return response
