"""What the bus knows about an event beyond its stored results: which topic holds it, how far
each agent reading that topic got with it, and the events its handlers published.

`omnidaemon result ID` and `GET /v1/events/{id}/result` use it so that the id `publish` printed
leads somewhere even when no agent of the event stored a result: in a pipeline the result is
usually stored on a later event, which this finds by its `causation_id`.

Everything here is read from a bounded window of recent entries (`SCAN_LIMIT` per topic and
priority lane), so the answer costs the same on a bus of any size; an event older than that
window is reported as not found, like an expired result. An event of a priority lane is
reported under its topic, each agent's progress read from that lane (`omnidaemon.lanes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel

from omnidaemon.brokers.base import GroupInfo, Subscription
from omnidaemon.lanes import Lane, lane_topic
from omnidaemon.lanes_view import describe_lanes, merge_lanes, topic_lanes
from omnidaemon.results import Result

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = ["SCAN_LIMIT", "AgentProgress", "EventProgress", "PublishedEvent", "event_progress"]

SCAN_LIMIT = 1_000
"""Recent entries read per topic (and lane), and dead-letter records per agent, to answer one
event."""

AgentState = Literal["handled", "in_progress", "dead_lettered", "cancelled", "not_yet", "unknown"]


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
    newer = 0  # entries of its lane after the event: the group's lag says if it was handed out
    found_lane: Lane = "normal"
    on_bus = await topic_lanes(broker)
    for topic, lanes in on_bus.items():
        for lane in lanes:  # each lane apart: a group's lag is its lane's
            entries = await broker.entries(lane_topic(topic, lane), SCAN_LIMIT)
            for index, (entry_id, data) in enumerate(entries):
                fields = _envelope_fields(data)
                if fields.get("id") == event_id:
                    progress.topic, found_lane = topic, lane
                    newer = len(entries) - 1 - index
                elif fields.get("causation_id") == event_id and isinstance(fields.get("id"), str):
                    child = PublishedEvent(event_id=fields["id"], topic=topic)
                    children.append((entry_id, child))
    # Stream ids start with milliseconds since the epoch: they order events across topics.
    children.sort(key=lambda c: tuple(int(part) for part in c[0].split("-")))
    progress.published = [child for _, child in children]
    if progress.topic is None:
        return progress
    infos = await describe_lanes(broker, progress.topic, lanes=on_bus[progress.topic])
    info = merge_lanes(progress.topic, infos)
    lane_info = infos.get(found_lane)
    in_lane = {g.group: g for g in lane_info.groups} if lane_info is not None else {}
    for group in sorted(info.groups, key=lambda g: g.group) if info is not None else []:
        record = stored.get(group.group)
        result = Result.decode(record) if record is not None else None
        state: AgentState
        if result is not None and result.status == "succeeded":
            state = "handled"
        elif result is not None and result.status in ("dead_lettered", "cancelled"):
            state = result.status
        elif result is not None and result.status in ("running", "retrying"):
            state = "in_progress"
        else:
            state = await _state_in_lane(broker, in_lane.get(group.group), event_id, newer)
        progress.agents.append(AgentProgress(agent=group.group, state=state, result=result))
    return progress


async def _state_in_lane(
    broker: Broker, group: GroupInfo | None, event_id: str, newer: int
) -> AgentState:
    """An agent's progress with an event `newer` entries from the end of its lane, from the
    agent's group on that lane (its `topic` is the lane's; `None`: the agent has not read
    the lane yet)."""
    if group is None:
        return "not_yet"  # it reads the lane from its first entry once it starts to
    if await _dead_lettered(broker, Subscription(group.topic, group.group), event_id):
        return "dead_lettered"
    if group.lag is not None and newer < group.lag:
        return "not_yet"  # the group has not been handed the event yet
    if group.lag is not None and group.pending == 0 and group.retries == 0:
        return "handled"  # handed out, and the group has nothing unsettled
    return "unknown"


async def _dead_lettered(broker: Broker, sub: Subscription, event_id: str) -> bool:
    for _, record in await broker.dead_letters(sub, SCAN_LIMIT):
        if _envelope_fields(record).get("event_id") == event_id:
            return True
    return False
