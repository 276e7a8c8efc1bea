"""Streamed output over HTTP: `GET /v1/events/{event_id}/stream`, the chunks a handler emits
(`ctx.emit`) as Server-Sent Events, from the start of the stream or after `Last-Event-ID`.

Each SSE event is one entry of the event's output log (its `id:` is the entry's id, so a
client that reconnects with `Last-Event-ID` resumes exactly after it), or a restart the
reader inferred (without `id:`). Kinds (`event:`): `chunk`, `restart` (an attempt ended
without a result; the next one streams anew), `truncated` (an attempt passed its bound),
`end` (the last event; the stream closes after it), and `timeout` (nothing came for
`timeout` seconds; the stream closes, and a client may reconnect to go on). A comment line
(`: keep-alive`) goes out after `HEARTBEAT` seconds without an event, so proxies keep the
connection open.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from omnidaemon.api.auth import Scope
from omnidaemon.api.dependencies import CurrentApp, Waiting, require
from omnidaemon.api.errors import ApiError, documented
from omnidaemon.api.waiting import WaitingRequests
from omnidaemon.app import App
from omnidaemon.envelope import dumps
from omnidaemon.streaming.follower import StreamEvent, StreamFollower

__all__ = ["HEARTBEAT", "router", "sse_frame", "stream_response"]

router = APIRouter(tags=["events"])

HEARTBEAT = 15.0
"""Seconds without an event after which a `: keep-alive` comment is sent."""

_SLICE = 5.0  # seconds of one waiting read before the first event


def sse_frame(event: StreamEvent) -> bytes:
    """One Server-Sent Event: `id:` (when the event is an entry of the log), `event:` and
    one line of JSON `data:`."""
    head = f"id: {event.id}\n" if event.id is not None else ""
    return f"{head}event: {event.kind}\ndata: ".encode() + dumps(event.to_json()) + b"\n\n"


async def _first(follower: StreamFollower, timeout: float) -> list[StreamEvent]:
    """The events read once the stream exists (or the end was read before `after`), or none
    when nothing of it came within `timeout`."""
    deadline = time.monotonic() + timeout
    events: list[StreamEvent] = []
    while not (follower.seen or follower.end is not None):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        events += await follower.read(min(left, _SLICE))
    return events


async def _frames(
    follower: StreamFollower, first: list[StreamEvent], timeout: float, slot: AsyncExitStack
) -> AsyncIterator[bytes]:
    try:
        for event in first:
            yield sse_frame(event)
        idle_since = time.monotonic()
        while follower.end is None:
            left = idle_since + timeout - time.monotonic()
            if left <= 0:
                message = f"nothing was streamed for {timeout:g} s; reconnect to go on"
                yield b"event: timeout\ndata: " + dumps({"message": message}) + b"\n\n"
                return
            events = await follower.read(min(HEARTBEAT, left))
            if not events:
                yield b": keep-alive\n\n"  # a silent read lasts up to HEARTBEAT seconds
                continue
            idle_since = time.monotonic()
            for event in events:
                yield sse_frame(event)
    finally:
        await slot.aclose()


@router.get(
    "/events/{event_id}/stream",
    dependencies=[require(Scope.read)],
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "The stream's events (`chunk`, `restart`, `truncated`, `end`).",
        },
        204: {"description": "Resumed after the stream's end: nothing more will come."},
        **documented(401, 403, 404, 422, 503),
    },
)
async def event_stream(
    event_id: Annotated[str, Path(min_length=1, max_length=200, description="The event's id.")],
    app: CurrentApp,
    waiting: Waiting,
    request: Request,
    agent: Annotated[
        str | None,
        Query(max_length=200, description="Follow this agent's stream (default: the first)."),
    ] = None,
    timeout: Annotated[
        float,
        Query(
            gt=0,
            le=300,
            description="Seconds to wait for the stream to start (404 after), and then for "
            "each next event (the stream closes with a `timeout` event after).",
        ),
    ] = 30.0,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=200,
            description="Resume after this event (sent by an `EventSource` that reconnects); "
            "an id the stream does not hold reads it from the start.",
        ),
    ] = None,
) -> Response:
    """The output an event's handler streams (`ctx.emit`), as Server-Sent Events
    (`text/event-stream`), from its start or after `Last-Event-ID`: a client that connects
    late misses nothing (`omnidaemon publish --wait --stream`).

    Events: `chunk` (`{"agent", "attempt", "index", "data"}`), `restart` (the attempt
    `attempt` ended without a result, with its `error`; the next attempt streams from its
    start), `truncated` (the attempt passed its bound), `end` (`{"agent", "attempt",
    "status", "result" | "error"}`; the stream closes after it) and `timeout`. Each event
    read from the log has an `id:`. 404 when nothing was streamed for the event within
    `timeout` (no worker runs the agent yet, the agent does not stream, or the stream
    expired); 204 when resumed after the end; 503 with `Retry-After` when the server's bound
    on waiting requests is reached. Needs the `read` scope.
    """
    response = await stream_response(
        app, waiting, request, event_id, agent=agent, timeout=timeout, after=last_event_id
    )
    if response is None:
        who = f"agent {agent!r}" if agent else "any agent"
        raise ApiError(
            404,
            "not_found",
            f"nothing was streamed for event {event_id!r} by {who} within {timeout:g} s (not "
            "handled yet, by an agent that does not stream, or the stream expired)",
        )
    return response


async def stream_response(
    app: App,
    waiting: WaitingRequests,
    request: Request,
    event_id: str,
    *,
    agent: str | None,
    timeout: float,
    after: str | None,
) -> Response | None:
    """The stream of `event_id` as Server-Sent Events (this route's, and the dashboard's
    `/ui/events/{id}/stream`): `None` when nothing was streamed within `timeout`, 204 when
    resumed `after` the end.

    Raises:
        ApiError: 503 when the server's bound on waiting requests is reached.
    """
    follower = StreamFollower(app.broker, event_id, agent=agent, after=after)
    first = await waiting.wait(request, lambda: _first(follower, timeout))
    if not follower.seen:
        return None
    if follower.end is not None and not first:
        return Response(status_code=204)
    slot = AsyncExitStack()
    await slot.enter_async_context(waiting.slot())  # 503 now, before the stream starts
    return StreamingResponse(
        _frames(follower, first, timeout, slot),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
