"""Priorities: each topic has three lanes, and every agent of the topic serves higher lanes first.

An event published with `priority="high"` (or `"low"`) goes to its topic's high (low) lane, a
sibling topic of the bus named `<topic>#high` (`<topic>#low`): `#` is never part of a topic
name, so no user topic can collide with a lane. The normal lane is the topic itself, so an app
that never uses priorities pays nothing and nothing migrates. Each lane is a topic of its own
on every bus (a stream on Redis, a stream on NATS, a queue in memory), so delivery, retries,
leases, takeovers and dead letters work in each lane exactly as in any topic.

Publishers mark a topic's lanes as used (a value on the bus) before the first event they send
to one, and workers start reading a topic's lanes once they see that mark: until then an
agent reads its topic alone, as before priorities existed. See `omnidaemon.worker.lanes` for
how an agent serves its lanes, and docs/flow-control.md for the guarantee.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = [
    "LANES",
    "LANES_MARK_TTL",
    "Lane",
    "LaneMarks",
    "Priority",
    "lane_named",
    "lane_of",
    "lane_topic",
    "lanes_mark_key",
    "parse_priority",
    "split_lane_topic",
]

Lane = Literal["high", "normal", "low"]
Priority = Lane | int
"""`"high"`, `"normal"` or `"low"`, or an int from 0 (lowest) to 9 (highest): 7-9 are high,
3-6 normal, 0-2 low (the range RabbitMQ and AMQP use, with higher meaning sooner)."""

LANES: tuple[Lane, ...] = ("high", "normal", "low")
_BY_NAME: dict[str, Lane] = {lane: lane for lane in LANES}
_SEPARATOR = "#"
LANES_MARK_TTL = 365 * 24 * 3600.0
"""Seconds the mark that a topic's lanes are used lives; publishers renew it hourly."""


def lane_of(priority: Priority | None) -> Lane:
    """The lane a priority maps to; `ValueError` for anything else."""
    if priority is None:
        return "normal"
    if isinstance(priority, bool) or not isinstance(priority, str | int):
        raise ValueError(f"invalid priority {priority!r}: use 'high', 'normal', 'low' or 0-9")
    if isinstance(priority, int):
        if not 0 <= priority <= 9:
            raise ValueError(f"invalid priority {priority}: an int priority is 0 (low) to 9 (high)")
        return "high" if priority >= 7 else "low" if priority <= 2 else "normal"
    lane = lane_named(priority)
    if lane is None:
        raise ValueError(f"invalid priority {priority!r}: use 'high', 'normal', 'low' or 0-9")
    return lane


def lane_named(name: str) -> Lane | None:
    """The lane called `name` (`"high"`, `"normal"`, `"low"`), else `None`."""
    return _BY_NAME.get(name)


def parse_priority(text: str | None) -> Priority | None:
    """A priority as written on a command line or in a setting (`high`, `7`); `lane_of`
    checks it."""
    if text is None:
        return None
    text = text.strip().lower()
    if text.isascii() and text.isdigit():
        return int(text)
    lane = lane_named(text)
    if lane is not None:
        return lane
    raise ValueError(f"invalid priority {text!r}: use 'high', 'normal', 'low' or 0-9")


def lane_topic(topic: str, lane: Lane) -> str:
    """The bus topic that holds `topic`'s events of `lane` (the topic itself for normal)."""
    return topic if lane == "normal" else f"{topic}{_SEPARATOR}{lane}"


def split_lane_topic(name: str) -> tuple[str, Lane]:
    """The topic and lane of a bus topic (`("a.b", "high")` for `a.b#high`)."""
    topic, separator, suffix = name.rpartition(_SEPARATOR)
    lane = lane_named(suffix) if separator else None
    if lane is None or lane == "normal":
        return name, "normal"
    return topic, lane


def lanes_mark_key(topic: str) -> str:
    """The key of the value that says a topic's high or low lane has been published to."""
    return f"lanes:{topic}"


_MARK_RENEW = 3600.0  # seconds between a publisher's renewals of a topic's mark


class LaneMarks:
    """A publisher's record of the topics whose lanes it has marked as used, so that it writes
    the mark once an hour per topic, not once per event."""

    def __init__(self) -> None:
        self._marked: dict[str, float] = {}

    def due(self, topic: str, lane: Lane) -> str | None:
        """The key of the mark to write before publishing to `topic`'s `lane`, if one is due."""
        if lane == "normal":
            return None
        marked = self._marked.get(topic)
        if marked is not None and time.monotonic() - marked < _MARK_RENEW:
            return None
        return lanes_mark_key(topic)

    def written(self, topic: str) -> None:
        """The mark of `topic` is on the bus."""
        self._marked[topic] = time.monotonic()

    async def bus_topic(self, broker: Broker, topic: str, lane: Lane) -> str:
        """The bus topic of `topic`'s `lane`, with the lanes' mark written first if due (so
        that a worker that sees a lane's event has seen the mark too)."""
        key = self.due(topic, lane)
        if key is not None:
            await broker.set_value(key, b"1", LANES_MARK_TTL)
            self.written(topic)
        return lane_topic(topic, lane)
