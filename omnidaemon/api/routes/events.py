"""Events: publish (`omnidaemon publish`), request-reply (`publish --wait`), what became of an
event (`omnidaemon result`), and cancelling events and runs (`omnidaemon cancel`)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from omnidaemon.api.auth import Scope
from omnidaemon.api.control_models import CancelResponse
from omnidaemon.api.dependencies import CurrentApp, Waiting, require
from omnidaemon.api.errors import ApiError, documented
from omnidaemon.api.models import (
    EventResults,
    PublishRequest,
    PublishResponse,
    ReplyRequest,
    ReplyResponse,
)
from omnidaemon.errors import AgentFailed, Cancelled
from omnidaemon.progress import EventProgress, event_progress
from omnidaemon.results import Result, event_results

__all__ = ["router"]

router = APIRouter(tags=["events"])


@router.post(
    "/events",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[require(Scope.publish)],
    responses=documented(400, 401, 403, 413, 415, 422, 503),
)
async def publish_event(
    body: PublishRequest, app: CurrentApp, response: Response
) -> PublishResponse:
    """Publish one event; answers its id once the bus holds it (`omnidaemon publish`).

    A payload that contradicts the type the app's agents declare for the topic is refused
    (422) and nothing is sent. `Location` names where the event's result will be. Needs the
    `publish` scope.
    """
    event_id = await app.publish(
        body.topic,
        body.payload,
        correlation_id=body.correlation_id,
        reply_to=body.reply_to,
        webhook=body.webhook,
        tenant_id=body.tenant_id,
        headers=body.headers,
        delay=body.delay,
        priority=body.priority,
    )
    response.headers["Location"] = f"/v1/events/{event_id}/result"
    return PublishResponse(event_id=event_id, topic=body.topic)


@router.post(
    "/requests",
    dependencies=[require(Scope.publish)],
    responses=documented(400, 401, 403, 409, 413, 415, 422, 502, 503, 504),
)
async def request_reply(
    body: ReplyRequest, app: CurrentApp, waiting: Waiting, request: Request
) -> ReplyResponse:
    """Publish a request and wait for the handling agent's return value
    (`omnidaemon publish --wait`).

    502 when the agent gave up on the request (dead-lettered), with its error; 409 when the
    request's event was cancelled (`DELETE /v1/events/{id}`), with the reason; 504 when no
    reply came within `timeout` (no worker runs the agent, or it is still retrying); 503 with
    `Retry-After` when the server's bound on waiting requests is reached (nothing was
    published). The wait ends when the client disconnects. Needs the `publish` scope.
    """

    async def ask() -> object:
        return await app.request(
            body.topic,
            body.payload,
            timeout=body.timeout,
            correlation_id=body.correlation_id,
            tenant_id=body.tenant_id,
            headers=body.headers,
            priority=body.priority,
        )

    try:
        reply = await waiting.wait(request, ask)
    except Cancelled as exc:
        raise ApiError(409, "cancelled", str(exc)) from None
    except AgentFailed as exc:
        raise ApiError(502, "agent_failed", str(exc)) from None
    except TimeoutError as exc:
        raise ApiError(504, "timeout", str(exc)) from None
    return ReplyResponse(topic=body.topic, reply=reply)


@router.get(
    "/events/{event_id}/result",
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503, 504),
)
async def event_result(
    event_id: Annotated[str, Path(min_length=1, max_length=200, description="The event's id.")],
    app: CurrentApp,
    waiting: Waiting,
    request: Request,
    agent: Annotated[
        str | None,
        Query(max_length=200, description="Only this agent's result."),
    ] = None,
    wait: Annotated[
        float | None,
        Query(
            gt=0,
            le=300,
            description="Wait up to this many seconds for the event to finish (504 after).",
        ),
    ] = None,
) -> EventResults:
    """The stored status and result of an event, per agent (`omnidaemon result`).

    Results are stored by agents declared with `store_results=True`. When none is stored
    (or `wait` ran out) but the bus still holds the event, the answer says what it knows
    instead: `topic`, each reading agent's progress (`agents`) and the events its handlers
    published (`published`), whose ids lead along a pipeline. 404 when the bus knows nothing
    of the id (unknown, trimmed or expired), or `agent` stored no result for it; 504 when
    `wait` ran out and the event is not among the topics' recent entries. With `wait`, 503
    with `Retry-After` when the server's bound on waiting requests is reached, and the wait
    ends when the client disconnects. Needs the `read` scope.
    """
    try:
        if wait is None:
            results = await event_results(app, event_id, agent=agent)
        else:
            results = await waiting.wait(
                request, lambda: event_results(app, event_id, agent=agent, timeout=wait)
            )
    except TimeoutError as exc:
        progress = await event_progress(app.broker, event_id)
        if progress.topic is None or agent is not None:
            raise ApiError(504, "timeout", str(exc)) from None
        results = await event_results(app, event_id, agent=agent)
        return _with_progress(event_id, results, progress)
    if all(r.status == "pending" for r in results):
        # Asked about one agent, the answer stays about it; otherwise, what the bus knows.
        known = await event_progress(app.broker, event_id) if agent is None else None
        if known is not None and known.topic is not None:
            return _with_progress(event_id, results, known)
        nothing = f"agent {agent!r} stored no result" if agent else "no result is stored"
        raise ApiError(
            404,
            "not_found",
            f"{nothing} for event {event_id!r} (an unknown id, not handled yet by an agent "
            "with store_results=True, or expired)",
        )
    return EventResults(event_id=event_id, results=results)


_REASON = Query(max_length=1000, description="Why; recorded with the event's outcome.")


@router.delete(
    "/events/{event_id}",
    dependencies=[require(Scope.admin)],
    responses=documented(401, 403, 422, 503),
)
async def cancel_event(
    event_id: Annotated[str, Path(min_length=1, max_length=200, description="The event's id.")],
    app: CurrentApp,
    agent: Annotated[
        list[str] | None,
        Query(max_length=200, description="Only this agent's handling (repeatable)."),
    ] = None,
    reason: Annotated[str, _REASON] = "cancelled through the HTTP API",
) -> CancelResponse:
    """Cancel an event across the fleet (`omnidaemon cancel`): not started yet, it never
    starts; running, its handler is stopped within about a second; its outcome is
    `cancelled`. Answers the cancellation as stored (merged with an earlier one of the same
    event). Needs the `admin` scope.
    """
    stored = await app.cancel(event_id, reason=reason, agent=agent or None)
    return CancelResponse.model_validate(stored.to_json())


@router.delete(
    "/runs/{correlation_id}",
    dependencies=[require(Scope.admin)],
    responses=documented(401, 403, 422, 503),
)
async def cancel_run(
    correlation_id: Annotated[
        str, Path(min_length=1, max_length=200, description="The run's correlation id.")
    ],
    app: CurrentApp,
    reason: Annotated[str, _REASON] = "cancelled through the HTTP API",
) -> CancelResponse:
    """Cancel a whole run (`omnidaemon cancel --correlation-id`): every event with this
    correlation id not finished yet, including those its handlers publish later. Needs the
    `admin` scope.
    """
    stored = await app.cancel(correlation_id=correlation_id, reason=reason)
    return CancelResponse.model_validate(stored.to_json())


def _with_progress(event_id: str, results: list[Result], progress: EventProgress) -> EventResults:
    return EventResults(
        event_id=event_id,
        results=results,
        topic=progress.topic,
        agents=progress.agents,
        published=progress.published,
    )
