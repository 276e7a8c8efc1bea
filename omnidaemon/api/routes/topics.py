"""Topics: list (`bus list`), describe, recent entries (`bus inspect`), groups (`bus groups`)
and purge (`bus purge`)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query

from omnidaemon.admin import purge_topic, recent_entries, require_topic
from omnidaemon.api.auth import ApiToken, Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import documented
from omnidaemon.api.models import (
    ConsumerInfo,
    Entry,
    EntryList,
    GroupInfo,
    GroupList,
    TopicInfo,
    TopicList,
    TopicName,
    TopicPurged,
)
from omnidaemon.brokers.base import GroupInfo as BusGroup
from omnidaemon.brokers.base import TopicInfo as BusTopic
from omnidaemon.fleet import describe_topics
from omnidaemon.observability.logging import get_logger

__all__ = ["TopicPath", "group_model", "router", "topic_model"]

router = APIRouter(tags=["topics"])

_log = get_logger("omnidaemon.api")

TopicPath = Annotated[TopicName, Path(description="The topic, e.g. `document.uploaded`.")]
"""A topic named in the path, checked as publishing checks it (422 when invalid)."""


def group_model(g: BusGroup) -> GroupInfo:
    """The API's view of a consumer group (`agent` is the group's name)."""
    return GroupInfo(
        topic=g.topic,
        agent=g.group,
        consumers=g.consumers,
        pending=g.pending,
        lag=g.lag,
        retries=g.retries,
        dead_letters=g.dead_letters,
        oldest_pending_age=g.oldest_pending_age,
        consumer_details=[
            ConsumerInfo(name=c.name, pending=c.pending, idle=c.idle) for c in g.consumer_details
        ],
    )


def topic_model(t: BusTopic) -> TopicInfo:
    """The API's view of a topic."""
    return TopicInfo(
        topic=t.topic,
        length=t.length,
        delayed=t.delayed,
        delayed_bytes=t.delayed_bytes,
        groups=[group_model(g) for g in t.groups],
    )


@router.get("/topics", dependencies=[require(Scope.read)], responses=documented(401, 403, 422, 503))
async def list_topics(
    app: CurrentApp,
    include_replies: Annotated[
        bool,
        Query(alias="all", description="Include the reply topics of requests in progress."),
    ] = False,
) -> TopicList:
    """Every topic with its length and, per agent, lag, pending, retries and dead letters
    (`omnidaemon bus list --json`). Needs the `read` scope."""
    topics = await describe_topics(app.broker, include_replies=include_replies)
    return TopicList(topics=[topic_model(t) for t in topics])


@router.get(
    "/topics/{topic}",
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503),
)
async def get_topic(topic: TopicPath, app: CurrentApp) -> TopicInfo:
    """One topic's length, delayed entries and agents. Needs the `read` scope."""
    return topic_model(await require_topic(app.broker, topic))


@router.get(
    "/topics/{topic}/entries",
    # An entry has the fields it was read with: an envelope's, or `unreadable` alone.
    response_model_exclude_unset=True,
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503),
)
async def topic_entries(
    topic: TopicPath,
    app: CurrentApp,
    limit: Annotated[int, Query(ge=1, le=1000, description="How many, the most recent.")] = 10,
) -> EntryList:
    """The topic's most recent entries, oldest first, decoded: event id, time, correlation,
    payload (`omnidaemon bus inspect --json`). Needs the `read` scope."""
    entries = await recent_entries(app.broker, topic, limit)
    return EntryList(topic=topic, entries=[Entry.model_validate(e) for e in entries])


@router.get(
    "/topics/{topic}/groups",
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503),
)
async def topic_groups(topic: TopicPath, app: CurrentApp) -> GroupList:
    """The topic's consumer groups (agents), each with its consumers (workers)
    (`omnidaemon bus groups --json`). Needs the `read` scope."""
    info = await require_topic(app.broker, topic, consumers=True)
    return GroupList(topic=topic, length=info.length, groups=[group_model(g) for g in info.groups])


@router.delete("/topics/{topic}", responses=documented(401, 403, 404, 422, 503))
async def delete_topic(
    topic: TopicPath,
    app: CurrentApp,
    token: Annotated[ApiToken, require(Scope.admin)],
) -> TopicPurged:
    """Delete a topic with everything it holds: entries, groups, retries, dead letters,
    metrics (`omnidaemon bus purge TOPIC --yes`). Workers still consuming it recreate it,
    empty: stop them first to make it go for good. Needs the `admin` scope."""
    info = await purge_topic(app.broker, topic)
    _log.warning("topic purged", topic=topic, entries=info.length, token=token.name)
    return TopicPurged(topic=topic, entries=info.length, agents=[g.group for g in info.groups])
