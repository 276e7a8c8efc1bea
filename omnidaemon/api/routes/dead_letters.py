"""Dead letters: list (`bus dlq`), replay (`bus replay`) and purge (`bus purge --dlq`)."""

from collections.abc import Iterable
from typing import Annotated

from fastapi import APIRouter, Query

from omnidaemon import admin
from omnidaemon.api.auth import ApiToken, Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import ApiError, documented
from omnidaemon.api.models import (
    DeadLetterList,
    DeadLetterRecord,
    DeadLettersPurged,
    ReplayRequest,
    ReplayResponse,
    UndecodableDeadLetter,
)
from omnidaemon.api.routes.topics import TopicPath
from omnidaemon.dead_letters import DeadLetter, UndecodableRecord
from omnidaemon.observability.logging import get_logger

__all__ = ["router"]

router = APIRouter(tags=["dead letters"])

_log = get_logger("omnidaemon.api")

AgentQuery = Annotated[str | None, Query(max_length=200, description="Only this agent.")]
LimitQuery = Annotated[int, Query(ge=1, le=1000, description="How many, the most recent.")]


def _record(d: DeadLetter) -> DeadLetterRecord:
    return DeadLetterRecord.model_validate({**d.model_dump(), "payload": d.payload})


def _undecodable(records: Iterable[UndecodableRecord]) -> list[UndecodableDeadLetter]:
    return [
        UndecodableDeadLetter(record_id=r.record_id, topic=r.topic, agent=r.agent, reason=r.reason)
        for r in records
    ]


def _listing(found: admin.DeadLetterListing) -> DeadLetterList:
    return DeadLetterList(
        dead_letters=[_record(d) for d in found.letters],
        undecodable=_undecodable(found.undecodable),
    )


@router.get(
    "/dlq", dependencies=[require(Scope.read)], responses=documented(401, 403, 404, 422, 503)
)
async def list_dead_letters(
    app: CurrentApp, agent: AgentQuery = None, limit: LimitQuery = 20
) -> DeadLetterList:
    """The most recent dead letters of every topic, oldest first: the error, the attempts,
    the traceback and the payload of each (`omnidaemon bus dlq --json`). Records that cannot
    be read are listed apart, in `undecodable`. Needs the `read` scope."""
    return _listing(await admin.find_dead_letters(app.broker, agent=agent, limit=limit))


@router.get(
    "/dlq/{topic}",
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503),
)
async def topic_dead_letters(
    topic: TopicPath, app: CurrentApp, agent: AgentQuery = None, limit: LimitQuery = 20
) -> DeadLetterList:
    """The most recent dead letters of one topic, oldest first
    (`omnidaemon bus dlq TOPIC --json`). Records that cannot be read are listed apart, in
    `undecodable`. Needs the `read` scope."""
    found = await admin.find_dead_letters(app.broker, topic=topic, agent=agent, limit=limit)
    return _listing(found)


@router.post("/dlq/{topic}/replay", responses=documented(400, 401, 403, 404, 413, 415, 422, 503))
async def replay_dead_letters(
    topic: TopicPath,
    body: ReplayRequest,
    app: CurrentApp,
    token: Annotated[ApiToken, require(Scope.admin)],
) -> ReplayResponse:
    """Deliver an agent's dead letters to it again, each as a first attempt
    (`omnidaemon bus replay`). Only that agent sees them again; the records leave the
    dead-letter queue as they go. `dry_run` says what would be replayed and changes nothing.

    Named events that are not in the queue are listed in `missing`; 404 when none of them is.
    Records that cannot be read are not replayed: they stay in the queue, listed in
    `undecodable`. Needs the `admin` scope.
    """
    wanted = None if body.all else set(body.event_ids or ())
    if body.dry_run:
        preview = await admin.preview_replay(app.broker, topic, body.agent, event_ids=wanted)
        chosen = [d.event_id for d in preview.chosen]
        missing = sorted(wanted.difference(chosen)) if wanted is not None else []
        replayed, undecodable = 0, preview.undecodable
    else:
        outcome = await admin.replay_dead_letters(app.broker, topic, body.agent, event_ids=wanted)
        chosen, missing, replayed = list(outcome.event_ids), list(outcome.missing), outcome.replayed
        undecodable = outcome.undecodable
        _log.warning(
            "dead letters replayed",
            topic=topic,
            agent=body.agent,
            replayed=replayed,
            undecodable=len(undecodable),
            token=token.name,
        )
    if wanted and not chosen:
        raise ApiError(
            404,
            "not_found",
            f"none of the named events is in {body.agent}'s dead letters on {topic}",
        )
    return ReplayResponse(
        topic=topic,
        agent=body.agent,
        dry_run=body.dry_run,
        replayed=replayed,
        event_ids=chosen,
        missing=missing,
        undecodable=_undecodable(undecodable),
    )


@router.delete("/dlq/{topic}", responses=documented(401, 403, 404, 422, 503))
async def purge_dead_letters(
    topic: TopicPath,
    app: CurrentApp,
    token: Annotated[ApiToken, require(Scope.admin)],
    agent: AgentQuery = None,
) -> DeadLettersPurged:
    """Empty the topic's dead-letter queues, every agent's or only `agent`'s
    (`omnidaemon bus purge TOPIC --dlq --yes`). The records are gone for good. Needs the
    `admin` scope."""
    removed = await admin.purge_dead_letters(app.broker, topic, agent=agent)
    _log.warning("dead letters purged", topic=topic, agent=agent, removed=removed, token=token.name)
    return DeadLettersPurged(topic=topic, agent=agent, removed=removed)
