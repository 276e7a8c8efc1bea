"""What the topic and agent pages show, read from the bus with the functions the CLI and the
JSON API use (`omnidaemon.admin`, `omnidaemon.fleet`, `omnidaemon.activity`,
`omnidaemon.topology`): a topic's recent entries, its groups and their consumers, the
deliveries live workers hold; an agent's declaration, fleet metrics and workers.

Nothing here writes to the bus, and nothing reads it but through those functions: the pages
show what `omnidaemon bus inspect`, `bus groups`, `metrics` and `inspect` print.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio

from omnidaemon.activity import RunningEvent, fleet_activity
from omnidaemon.admin import recent_entries, require_topic
from omnidaemon.app import App
from omnidaemon.brokers.base import GroupInfo, TopicInfo
from omnidaemon.dashboard.formatting import cut, pretty_json
from omnidaemon.errors import NotFound
from omnidaemon.fleet import WorkerStatus, describe_topics, fleet_metrics, live_workers
from omnidaemon.lanes import split_lane_topic
from omnidaemon.metrics import AgentMetricsSnapshot
from omnidaemon.topology import describe_agent

__all__ = [
    "MAX_ENTRIES",
    "READ_TIMEOUT",
    "AgentView",
    "ConsumerRow",
    "EntryRow",
    "GroupView",
    "HeldDelivery",
    "TopicView",
    "WorkerRow",
    "read_agent",
    "read_topic",
    "read_topics",
]

READ_TIMEOUT = 5.0
"""Seconds a page's reads may take: a page must not hang on a stuck bus."""

MAX_ENTRIES = 200
"""The most entries a topic page lists (`?limit=`)."""

_PAYLOAD_CHARS = 16_000  # a payload's shown text is cut here: the page stays light


@dataclass(frozen=True, slots=True)
class EntryRow:
    """A topic's entry as the page shows it: its envelope's fields, the payload as text."""

    entry_id: str
    event_id: str | None
    created_at: datetime | None
    correlation_id: str | None
    causation_id: str | None
    source: str | None
    priority: str | None  # the lane it is in (`high`, `low`), `None` for the topic's own
    payload: str  # pretty-printed JSON, or the entry's raw text when it is no envelope
    readable: bool
    truncated: bool


@dataclass(frozen=True, slots=True)
class HeldDelivery:
    """A delivery a live worker's handler runs now (pending in its agent's group)."""

    topic: str
    agent: str
    consumer: str
    event_id: str | None
    correlation_id: str | None
    entry_id: str
    attempt: int
    started_at: datetime
    running_for: float


@dataclass(frozen=True, slots=True)
class ConsumerRow:
    """A consumer of a group: how much it holds, how long it has been idle, whether a live
    worker's heartbeat names it (a gone worker's deliveries wait to be reclaimed)."""

    name: str
    pending: int
    idle: float
    live: bool


@dataclass(frozen=True, slots=True)
class GroupView:
    """A consumer group (one agent) of a topic, with its consumers."""

    info: GroupInfo
    consumers: list[ConsumerRow]
    declared: bool  # this app declares the agent on this topic


@dataclass(frozen=True, slots=True)
class TopicView:
    """Everything the topic page shows."""

    topic: str
    length: int
    delayed: int
    delayed_bytes: int | None
    groups: list[GroupView]
    entries: list[EntryRow]  # newest first
    held: list[HeldDelivery]
    consumers: list[str]  # the app's agents that consume the topic
    publishers: list[str]  # the app's agents that declare they publish to it
    read_at: datetime


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A live worker running the agent, with its own counts for it."""

    id: str
    app: str
    host: str
    pid: int
    topic: str
    concurrency: int
    in_flight: int
    counts: dict[str, int]
    beat_age: float
    uptime: float


@dataclass(frozen=True, slots=True)
class AgentView:
    """Everything the agent page shows."""

    name: str
    declared: dict[str, Any] | None  # `describe_agent`, when this app declares the agent
    schemas: dict[str, str]  # JSON Schemas, flow and debounce policies, pretty-printed
    metrics: list[AgentMetricsSnapshot]
    workers: list[WorkerRow]
    groups: list[GroupView]
    held: list[HeldDelivery]
    read_at: datetime


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _entry_row(entry: Mapping[str, Any]) -> EntryRow:
    unreadable = entry.get("unreadable")
    if isinstance(unreadable, str):
        payload, truncated = cut(unreadable, _PAYLOAD_CHARS)
    else:
        payload, truncated = cut(pretty_json(entry.get("payload")), _PAYLOAD_CHARS)
    return EntryRow(
        entry_id=str(entry["entry_id"]),
        event_id=_text(entry.get("id")),
        created_at=_time(entry.get("created_at")),
        correlation_id=_text(entry.get("correlation_id")),
        causation_id=_text(entry.get("causation_id")),
        source=_text(entry.get("source")),
        priority=_text(entry.get("priority")),
        payload=payload,
        readable=not isinstance(unreadable, str),
        truncated=truncated,
    )


def _group_view(group: GroupInfo, live: set[str], declared: bool) -> GroupView:
    consumers = [
        ConsumerRow(c.name, c.pending, c.idle, c.name in live)
        for c in sorted(group.consumer_details, key=lambda c: c.name)
    ]
    return GroupView(group, consumers, declared)


def _held(running: Iterable[tuple[str, RunningEvent]], now: datetime) -> list[HeldDelivery]:
    held = [
        HeldDelivery(
            topic=split_lane_topic(event.topic)[0],
            agent=event.agent,
            consumer=consumer,
            event_id=event.event_id,
            correlation_id=event.correlation_id,
            entry_id=event.entry_id,
            attempt=event.attempt,
            started_at=event.started_at,
            running_for=max(0.0, (now - event.started_at).total_seconds()),
        )
        for consumer, event in running
    ]
    held.sort(key=lambda h: h.started_at)
    return held


async def _running(app: App, agent: str | None = None) -> list[tuple[str, RunningEvent]]:
    """Every delivery live workers run now (of `agent` only), with the worker holding it."""
    found = await fleet_activity(app.broker, agent=agent)
    return [(activity.worker.id, event) for activity in found for event in activity.running]


async def read_topics(app: App) -> list[TopicInfo]:
    """Every topic on the bus with its groups (reply topics of requests left out)."""
    with anyio.fail_after(READ_TIMEOUT):
        return await describe_topics(app.broker)


async def read_topic(app: App, topic: str, *, limit: int) -> TopicView:
    """The topic page's data: `limit` most recent entries, groups with consumers, the
    deliveries live workers hold. A topic the app declares but the bus does not hold yet
    is shown empty.

    Raises:
        NotFound: the bus has no such topic, and the app declares none of that name.
        TimeoutError: the bus took longer than `READ_TIMEOUT`.
    """
    now = datetime.now(UTC)
    with anyio.fail_after(READ_TIMEOUT):
        try:
            info = await require_topic(app.broker, topic, consumers=True)
            entries = await recent_entries(app.broker, topic, limit)
        except NotFound:
            # A topic the app declares has a page (the graph links it) before anything was
            # published to it or any worker ran: empty, not "not found".
            if topic not in app.topology().topics:
                raise
            info, entries = TopicInfo(topic, 0, 0, ()), []
        live = {w.id for w in await live_workers(app.broker)}
        running = [
            (consumer, event)
            for consumer, event in await _running(app)
            if split_lane_topic(event.topic)[0] == topic
        ]
    specs = app.agents.values()
    declared = {spec.name for spec in specs if spec.topic == topic}
    return TopicView(
        topic=topic,
        length=info.length,
        delayed=info.delayed,
        delayed_bytes=info.delayed_bytes,
        groups=[_group_view(g, live, g.group in declared) for g in info.groups],
        entries=[_entry_row(e) for e in reversed(entries)],
        held=_held(running, now),
        consumers=sorted(declared),
        publishers=sorted(spec.name for spec in specs if spec.publishes == topic),
        read_at=now,
    )


def _worker_row(worker: WorkerStatus, agent: str, now: datetime) -> WorkerRow:
    info = worker.agents[agent]
    counts = ("received", "succeeded", "failed", "retried", "dead_lettered")
    return WorkerRow(
        id=worker.id,
        app=worker.app,
        host=worker.host,
        pid=worker.pid,
        topic=str(info.get("topic", "")),
        concurrency=int(info.get("concurrency", 0)),
        in_flight=int(info.get("in_flight", 0)),
        counts={name: int(info.get(name, 0)) for name in counts},
        beat_age=max(0.0, (now - worker.beat_at).total_seconds()),
        uptime=max(0.0, (now - worker.started_at).total_seconds()),
    )


async def read_agent(app: App, agent: str) -> AgentView:
    """The agent page's data: the app's declaration of `agent` (if it declares it), its fleet
    metrics, the live workers running it, its groups with their consumers and the deliveries
    workers hold. An agent of another app is shown from the bus alone.

    Raises:
        NotFound: the app does not declare `agent` and the bus knows no group or metrics of it.
        TimeoutError: the bus took longer than `READ_TIMEOUT`.
    """
    now = datetime.now(UTC)
    spec = app.agents.get(agent)
    with anyio.fail_after(READ_TIMEOUT):
        workers = await live_workers(app.broker)
        metrics = await fleet_metrics(app.broker, agent=agent, workers=workers)
        if spec is not None:
            topics = [spec.topic]
        else:  # another app's agent: wherever the bus has a group or metrics of that name
            groups = [g for t in await describe_topics(app.broker) for g in t.groups]
            topics = sorted(
                {g.topic for g in groups if g.group == agent} | {m.topic for m in metrics}
            )
            if not topics:
                raise NotFound(f"no agent {agent!r} in app {app.name!r} or on the bus")
        group_views = []
        for topic in topics:
            try:
                info = await require_topic(app.broker, topic, consumers=True)
            except NotFound:  # declared, never run: no group on the bus yet
                continue
            live = {w.id for w in workers}
            group_views += [
                _group_view(g, live, spec is not None) for g in info.groups if g.group == agent
            ]
        running = [
            (consumer, event)
            for consumer, event in await _running(app, agent)
            if split_lane_topic(event.topic)[0] in topics
        ]
    declared = describe_agent(spec) if spec is not None else None
    schemas = {}
    if declared is not None:
        for kind in ("payload_schema", "return_schema", "flow", "debounce"):
            schemas[kind] = pretty_json(declared[kind])
    return AgentView(
        name=agent,
        declared=declared,
        schemas=schemas,
        metrics=[m for m in metrics if m.topic in topics],
        workers=[
            _worker_row(w, agent, now)
            for w in workers
            if agent in w.agents and str(w.agents[agent].get("topic", "")) in topics
        ],
        groups=group_views,
        held=_held(running, now),
        read_at=now,
    )
