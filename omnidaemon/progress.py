"""What the bus knows about an event beyond its stored results: which topic holds it, how far
each agent reading that topic got with it, and the events its handlers published.

`omnidaemon result ID` and `GET /v1/events/{id}/result` use it so that the id `publish` printed
leads somewhere even when no agent of the event stored a result: in a pipeline the result is
usually stored on a later event, which this finds by its `causation_id`.

Everything here is read from a bounded window of recent entries (`SCAN_LIMIT` per topic), so
the answer costs the same on a bus of any size; an event older than that window is reported
as not found, like an expired result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel

from omnidaemon.brokers.base import Subscription
from omnidaemon.results import Result

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = ["SCAN_LIMIT", "AgentProgress", "EventProgress", "PublishedEvent", "event_progress"]

SCAN_LIMIT = 1_000
"""Recent entries read per topic, and dead-letter records per agent, to answer one event."""

AgentState = Literal["handled", "in_progress", "dead_lettered", "not_yet", "unknown"]


class PublishedEvent(BaseModel):
    """An event a handler of the event published (its `causation_id` is the event's id)."""

    event_id: str
    topic: str


class AgentProgress(BaseModel):
    """How far one agent reading the event's topic got with it.

    Attributes:
        agent: The agent (its consumer group).
        state: `handled` (settled: succeeded, or waiting for a retry when it stores no
            result), `in_progress`, `dead_lettered`, `not_yet` (nothing of the topic handed to
            it yet, or no worker runs it) or `unknown` (the group has other work pending; its
            stored result, when it keeps one, tells more).
        result: Its stored result, when the agent keeps results (`store_results=True`).
    """

    agent: str
    state: AgentState
    result: Result | None = None


class EventProgress(BaseModel):
    """Where an event is on the bus: its topic, each reading agent's progress, its children.

    Attributes:
        event_id: The event.
        topic: The topic holding it; `None` when it is not among the recent entries of any
            topic (unknown id, trimmed, or a delayed event not due yet).
        agents: One entry per consumer group of the topic, sorted by agent.
        published: Events its handlers published, oldest first: follow a pipeline with
            `omnidaemon result` on their ids.
    """

    event_id: str
    topic: str | None = None
    agents: list[AgentProgress] = []
    published: list[PublishedEvent] = []


def _envelope_fields(data: bytes) -> dict[str, Any]:
    """`id` and `causation_id` of an entry, read leniently: a bad entry is skipped, not fatal."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return raw if isinstance(raw, dict) else {}


async def event_progress(
    broker: Broker, event_id: str, results: dict[str, bytes] | None = None
) -> EventProgress:
    """Find the event among every topic's recent entries and report what became of it.

    Args:
        broker: A connected broker.
        event_id: The id `publish` returned.
        results: The event's stored results by agent, if already read.
    """
    stored = results if results is not None else await broker.get_results(event_id)
    progress = EventProgress(event_id=event_id)
    children: list[tuple[str, PublishedEvent]] = []
    newer = 0  # entries of its topic after the event: the group's lag says if it was handed out
    for topic in await broker.topics():
        entries = await broker.entries(topic, SCAN_LIMIT)
        for index, (entry_id, data) in enumerate(entries):
            fields = _envelope_fields(data)
            if fields.get("id") == event_id:
                progress.topic = topic
                newer = len(entries) - 1 - index
            elif fields.get("causation_id") == event_id and isinstance(fields.get("id"), str):
                children.append((entry_id, PublishedEvent(event_id=fields["id"], topic=topic)))
    # Stream ids start with milliseconds since the epoch: they order events across topics.
    children.sort(key=lambda c: tuple(int(part) for part in c[0].split("-")))
    progress.published = [child for _, child in children]
    if progress.topic is None:
        return progress
    info = await broker.describe(progress.topic)
    for group in sorted(info.groups, key=lambda g: g.group) if info is not None else []:
        record = stored.get(group.group)
        result = Result.decode(record) if record is not None else None
        state: AgentState
        if result is not None and result.status == "succeeded":
            state = "handled"
        elif result is not None and result.status == "dead_lettered":
            state = "dead_lettered"
        elif result is not None and result.status in ("running", "retrying"):
            state = "in_progress"
        elif await _dead_lettered(broker, Subscription(progress.topic, group.group), event_id):
            state = "dead_lettered"
        elif group.lag is not None and newer < group.lag:
            state = "not_yet"  # the group has not been handed the event yet
        elif group.lag is not None and group.pending == 0 and group.retries == 0:
            state = "handled"  # handed out, and the group has nothing unsettled
        else:
            state = "unknown"
        progress.agents.append(AgentProgress(agent=group.group, state=state, result=result))
    return progress


async def _dead_lettered(broker: Broker, sub: Subscription, event_id: str) -> bool:
    for _, record in await broker.dead_letters(sub, SCAN_LIMIT):
        if _envelope_fields(record).get("event_id") == event_id:
            return True
    return False
