"""A topic and its priority lanes seen as one topic, for every inspection and admin path.

On the bus a topic's high and low lanes are sibling topics (`<topic>#high`, `<topic>#low`; see
`omnidaemon.lanes`), each with its own entries, groups, pending deliveries, retries and
dead-letter queues. Operators, the CLI and the HTTP API name the topic only: the helpers here
read and change all of its lanes at once, and merge what they find.

Cost: one call per lane, three per topic at most; a helper given `lanes` (those found by
`topic_lanes` or `describe_lanes`) calls the bus for those alone. A topic that never used
priorities costs what it did, plus the two calls that find its lanes absent where the lanes
are not known yet. Entries and dead-letter records of several lanes are merged by time (see
`_merge_by_time`).

Merging rules (`merge_lanes`): sizes and counts are summed (`length`, `delayed`, and per group
`pending`, `retries`, `dead_letters`); `consumers` is the largest of the lanes' counts (the
same workers read every lane); `oldest_pending_age` is the largest; `lag` is the sum, or
`None` as soon as one lane's lag is unknown (a partial sum would pass for the whole backlog);
`delayed_bytes` likewise. Consumers are merged by name: pending summed, the smallest idle.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

import orjson

from omnidaemon.brokers.base import Broker, ConsumerInfo, GroupInfo, Subscription, TopicInfo
from omnidaemon.dead_letters import (
    DeadLetter,
    ReplaySelection,
    UndecodableRecord,
    read_dead_letters,
)
from omnidaemon.errors import NotFound
from omnidaemon.lanes import Lane, lane_topic, split_lane_topic

__all__ = [
    "VIEW_ORDER",
    "LaneItem",
    "LaneSelections",
    "dead_letters_with_lanes",
    "delete_topic_with_lanes",
    "describe_lanes",
    "describe_with_lanes",
    "entries_with_lanes",
    "find_lane_dead_letter",
    "lanes_with_group",
    "merge_lanes",
    "purge_backlog_with_lanes",
    "purge_dead_letters_with_lanes",
    "read_lane_dead_letters",
    "replay_with_lanes",
    "require_group_lanes",
    "require_lanes",
    "topic_lanes",
]

T = TypeVar("T")
Select = Callable[[str, bytes], bytes | None]

VIEW_ORDER: tuple[Lane, ...] = ("normal", "high", "low")
"""The order lanes are read in: the topic itself first, so that output without lanes is as
it was, and records of equal time list the topic's first."""

_STREAM_ID = re.compile(r"(\d+)-\d+")  # a Redis stream id: milliseconds since the epoch first


class LaneItem(NamedTuple):
    """An entry of a lane (`Broker.entries`) or a record of a lane's dead-letter queue
    (`Broker.dead_letters`), with the lane that holds it."""

    lane: Lane
    id: str
    data: bytes


# Which lanes -----------------------------------------------------------------------------


async def topic_lanes(broker: Broker) -> dict[str, tuple[Lane, ...]]:
    """Every topic on the bus (lanes folded into their topic), sorted, with the lanes of it
    that the bus holds (`VIEW_ORDER`). A lane whose topic is absent still lists the topic."""
    found: dict[str, set[Lane]] = {}
    for name in await broker.topics():
        topic, lane = split_lane_topic(name)
        found.setdefault(topic, set()).add(lane)
    return {t: tuple(lane for lane in VIEW_ORDER if lane in found[t]) for t in sorted(found)}


async def describe_lanes(
    broker: Broker,
    topic: str,
    *,
    consumers: bool = False,
    lanes: Iterable[Lane] = VIEW_ORDER,
) -> dict[Lane, TopicInfo]:
    """Each lane's own `Broker.describe` (of `lanes` only), for the lanes the bus holds."""
    found: dict[Lane, TopicInfo] = {}
    for lane in lanes:
        info = await broker.describe(lane_topic(topic, lane), consumers=consumers)
        if info is not None:
            found[lane] = info
    return found


async def require_lanes(
    broker: Broker, topic: str, *, consumers: bool = False
) -> tuple[TopicInfo, dict[Lane, TopicInfo]]:
    """The topic's merged info (`merge_lanes`) and each of its lanes' own.

    Raises:
        NotFound: neither the topic nor any of its lanes is on the bus.
    """
    lanes = await describe_lanes(broker, topic, consumers=consumers)
    info = merge_lanes(topic, lanes)
    if info is None:
        raise NotFound(f"no topic {topic!r} on the bus")
    return info, lanes


async def require_group_lanes(
    broker: Broker, topic: str, agent: str
) -> tuple[GroupInfo, list[Lane]]:
    """The agent's group on the topic, merged over the lanes, and the lanes where it exists.

    Raises:
        NotFound: no agent of that name reads the topic or any of its lanes.
    """
    lanes = await describe_lanes(broker, topic)
    info = merge_lanes(topic, lanes)
    group = next((g for g in info.groups if g.group == agent), None) if info else None
    if group is None:
        raise NotFound(f"no agent {agent!r} reads topic {topic!r}")
    return group, lanes_with_group(lanes, agent)


def _lane_sub(sub: Subscription, lane: Lane) -> Subscription:
    """The group of `sub` (whose topic is the topic) on the topic's `lane`."""
    return Subscription(lane_topic(sub.topic, lane), sub.group, sub.start)


def lanes_with_group(
    infos: Mapping[Lane, TopicInfo], group: str, *, dead_letters: bool = False
) -> list[Lane]:
    """The lanes (of `describe_lanes`'s answer) where the group exists (and, with
    `dead_letters`, has dead letters)."""
    return [
        lane
        for lane, info in infos.items()
        if any(g.group == group and (g.dead_letters or not dead_letters) for g in info.groups)
    ]


# Describing ------------------------------------------------------------------------------


def _sum_known(values: Sequence[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v or 0 for v in values)


def _merge_consumers(groups: Sequence[GroupInfo]) -> tuple[ConsumerInfo, ...]:
    merged: dict[str, ConsumerInfo] = {}
    for c in (c for group in groups for c in group.consumer_details):
        seen = merged.get(c.name, ConsumerInfo(c.name, 0, c.idle))
        merged[c.name] = ConsumerInfo(c.name, seen.pending + c.pending, min(seen.idle, c.idle))
    return tuple(merged[name] for name in sorted(merged))


def _merge_group(topic: str, groups: Sequence[GroupInfo]) -> GroupInfo:
    ages = [g.oldest_pending_age for g in groups if g.oldest_pending_age is not None]
    return GroupInfo(
        topic=topic,
        group=groups[0].group,
        consumers=max(g.consumers for g in groups),
        pending=sum(g.pending for g in groups),
        lag=_sum_known([g.lag for g in groups]),
        retries=sum(g.retries for g in groups),
        dead_letters=sum(g.dead_letters for g in groups),
        oldest_pending_age=max(ages) if ages else None,
        consumer_details=_merge_consumers(groups),
    )


def merge_lanes(topic: str, infos: Mapping[Lane, TopicInfo]) -> TopicInfo | None:
    """One `TopicInfo` for `topic` out of its lanes' (see the module's docs for the rules):
    groups matched by name, in the order they are first met (the topic's own first), a group
    of a lane alone included. `None` when no lane exists; the topic's own info unchanged
    when it has no other lane."""
    if not infos:
        return None
    if list(infos) == ["normal"]:
        return infos["normal"]
    ordered = [infos[lane] for lane in VIEW_ORDER if lane in infos]
    by_group: dict[str, list[GroupInfo]] = {}
    for info in ordered:
        for g in info.groups:
            by_group.setdefault(g.group, []).append(g)
    return TopicInfo(
        topic=topic,
        length=sum(i.length for i in ordered),
        delayed=sum(i.delayed for i in ordered),
        groups=tuple(_merge_group(topic, groups) for groups in by_group.values()),
        delayed_bytes=_sum_known([i.delayed_bytes for i in ordered]),
    )


async def describe_with_lanes(
    broker: Broker, topic: str, *, consumers: bool = False, lanes: Iterable[Lane] = VIEW_ORDER
) -> TopicInfo | None:
    """`Broker.describe` of the topic with its lanes' numbers merged in (`merge_lanes`);
    `None` only when neither the topic nor any of its lanes is on the bus."""
    return merge_lanes(topic, await describe_lanes(broker, topic, consumers=consumers, lanes=lanes))


# Entries and dead letters ------------------------------------------------------------------


def _json_time(data: bytes, field: str) -> float | None:
    """The ISO time in `field` of a JSON object, as seconds since the epoch (naive is UTC)."""
    try:
        when = datetime.fromisoformat(orjson.loads(data).get(field))
    except (AttributeError, TypeError, ValueError):  # not JSON, not an object, not a time
        return None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def _entry_time(entry: LaneItem) -> float | None:
    # A Redis stream id says when the entry was appended; elsewhere the envelope's time.
    found = _STREAM_ID.fullmatch(entry.id)
    return int(found[1]) / 1000 if found else _json_time(entry.data, "created_at")


def _merge_by_time(
    lanes: Sequence[Sequence[T]], time_of: Callable[[T], float | None], limit: int
) -> list[T]:
    """The last `limit` items of the lanes' lists merged by time, each lane kept in its own
    order: an item without a time (or out of order) takes the time of the one before it in
    its lane, so it stays next to it."""
    present = [items for items in lanes if items]
    if len(present) <= 1:
        return list(present[0][-limit:]) if present and limit > 0 else []
    keyed: list[list[tuple[float, T]]] = []
    for items in present:
        last = float("-inf")
        stream: list[tuple[float, T]] = []
        for item in items:
            when = time_of(item)
            last = max(last, when) if when is not None else last
            stream.append((last, item))
        keyed.append(stream)
    merged = [item for _, item in heapq.merge(*keyed, key=lambda pair: pair[0])]
    return merged[-limit:] if limit > 0 else []


async def entries_with_lanes(
    broker: Broker, topic: str, limit: int, *, lanes: Iterable[Lane] = VIEW_ORDER
) -> list[LaneItem]:
    """The `limit` most recent entries of the topic's lanes, oldest first: by the Redis
    stream id's time, else by the envelope's `created_at` (see `_merge_by_time`)."""
    found = [
        [LaneItem(lane, i, d) for i, d in await broker.entries(lane_topic(topic, lane), limit)]
        for lane in lanes
    ]
    return _merge_by_time(found, _entry_time, limit)


async def dead_letters_with_lanes(
    broker: Broker, sub: Subscription, limit: int, *, lanes: Iterable[Lane] = VIEW_ORDER
) -> list[LaneItem]:
    """The `limit` most recent records of the group's dead-letter queues on the topic and its
    lanes (`sub.topic` is the topic), oldest first by their `failed_at` (a record without
    one stays next to the one before it in its queue)."""
    found = [
        [LaneItem(lane, i, d) for i, d in await broker.dead_letters(_lane_sub(sub, lane), limit)]
        for lane in lanes
    ]
    return _merge_by_time(found, lambda r: _json_time(r.data, "failed_at"), limit)


def read_lane_dead_letters(
    records: Iterable[LaneItem], topic: str, agent: str
) -> tuple[list[DeadLetter], list[UndecodableRecord]]:
    """`read_dead_letters` of merged records, in their order: an undecodable record names the
    lane topic whose queue holds it (`<topic>#high`), where it can be found on the bus."""
    letters: list[DeadLetter] = []
    undecodable: list[UndecodableRecord] = []
    for lane, record_id, data in records:
        where = lane_topic(topic, lane)
        readable, unreadable = read_dead_letters([(record_id, data)], where, agent)
        letters += readable
        undecodable += unreadable
    return letters, undecodable


def find_lane_dead_letter(
    records: Iterable[LaneItem], topic: str, agent: str, event_id: str
) -> tuple[DeadLetter, Lane] | None:
    """The first readable record of event `event_id` among `records`, with its lane."""
    for record in records:
        letters, _ = read_lane_dead_letters([record], topic, agent)
        if letters and letters[0].event_id == event_id:
            return letters[0], record.lane
    return None


# Changing --------------------------------------------------------------------------------


class LaneSelections:
    """The `select_for` of `replay_with_lanes`: a `ReplaySelection` per lane (an undecodable
    record names the lane topic whose queue holds it), with what they chose merged.

    Args:
        on_record: Called once per record looked at (a progress display).
    """

    def __init__(
        self,
        topic: str,
        agent: str,
        event_ids: Collection[str] | None = None,
        on_record: Callable[[], None] | None = None,
    ) -> None:
        self._topic, self._agent, self._event_ids = topic, agent, event_ids
        self._on_record = on_record
        self._selections: list[ReplaySelection] = []

    def __call__(self, lane: Lane) -> Select:
        selection = ReplaySelection(lane_topic(self._topic, lane), self._agent, self._event_ids)
        self._selections.append(selection)

        def select(record_id: str, record: bytes) -> bytes | None:
            if self._on_record is not None:
                self._on_record()
            return selection(record_id, record)

        return select

    @property
    def chosen(self) -> list[str | None]:
        """The event ids of the records chosen, lane after lane."""
        return [event_id for s in self._selections for event_id in s.chosen]

    @property
    def undecodable(self) -> list[UndecodableRecord]:
        """The records that could not be read, so were not replayed."""
        return [record for s in self._selections for record in s.undecodable]


async def replay_with_lanes(
    broker: Broker,
    sub: Subscription,
    select_for: Callable[[Lane], Select],
    *,
    lanes: Iterable[Lane] = VIEW_ORDER,
) -> int:
    """`Broker.replay_dead_letters` of the group on each lane, with `select_for(lane)` as that
    lane's `select`: each record goes back into its own lane, keeping its priority. Returns
    how many moved in all."""
    return sum(
        [await broker.replay_dead_letters(_lane_sub(sub, lane), select_for(lane)) for lane in lanes]
    )


async def purge_dead_letters_with_lanes(
    broker: Broker, sub: Subscription, *, lanes: Iterable[Lane] = VIEW_ORDER
) -> int:
    """`Broker.purge_dead_letters` of the group on each lane; returns how many were removed."""
    return sum([await broker.purge_dead_letters(_lane_sub(sub, lane)) for lane in lanes])


async def delete_topic_with_lanes(broker: Broker, topic: str, lanes: Collection[Lane]) -> None:
    """`Broker.delete_topic` of each of the topic's `lanes` (those `describe_lanes` found).

    The mark that the topic's lanes are used stays: publishers that know it write no other
    before their next hourly renewal, and new workers must find it to read the lanes."""
    for lane in lanes:
        await broker.delete_topic(lane_topic(topic, lane))


async def purge_backlog_with_lanes(broker: Broker, topic: str, lanes: Collection[Lane]) -> int:
    """`Broker.purge_backlog` of each of the topic's `lanes`; returns the entries dropped."""
    return sum([await broker.purge_backlog(lane_topic(topic, lane)) for lane in lanes])
