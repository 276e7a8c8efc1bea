"""The in-process bus behind `memory://` (`MemoryBroker`): topics, consumer groups, pending
deliveries, scheduled retries and delayed events, values, output logs and trace records, and
the clock that tests move forward. Brokers opened on one name share one `Bus` (`BUSES`)."""

from __future__ import annotations

import heapq
import itertools
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import anyio

from omnidaemon.brokers._memory_output import OutputLogs
from omnidaemon.brokers._memory_traces import TraceRecords
from omnidaemon.brokers.base import Delivery

__all__ = ["BUSES", "Bus", "Group", "Pending", "TopicState"]


@dataclass(slots=True)
class Pending:
    delivery: Delivery
    consumer: str
    leased_at: float
    # Wall-clock seconds the entry entered the queue it was delivered from: published (topic
    # entries) or handed out (retries, like Redis's retry stream), for `oldest_pending_age`.
    queued_at: float = 0.0


@dataclass(slots=True)
class Group:
    cursor: int
    pending: dict[tuple[str, str], Pending] = field(default_factory=dict)
    # consumer -> when it last fetched or renewed anything
    consumers: dict[str, float] = field(default_factory=dict)
    # (due, tiebreak, data, attempt): a heap ordered by due time.
    scheduled: list[tuple[float, int, bytes, int]] = field(default_factory=list)
    # (record id, record); ids count up per group, as a stream's would.
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    dead_seq: int = 0


@dataclass(slots=True)
class TopicState:
    # (sequence number, data, published at in wall-clock seconds)
    entries: deque[tuple[int, bytes, float]] = field(default_factory=deque)
    next_seq: int = 0
    groups: dict[str, Group] = field(default_factory=dict)
    # (due, tiebreak, data): delayed publishes, appended to `entries` when due.
    delayed: list[tuple[float, int, bytes]] = field(default_factory=list)


class Bus:
    """The shared state behind every `MemoryBroker` opened on one name."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.topics: dict[str, TopicState] = {}
        self.offset = 0.0  # seconds added to the monotonic clock by `fast_forward`
        # event id -> (expires at, {agent: record})
        self.results: dict[str, tuple[float, dict[str, bytes]]] = {}
        self.values: dict[str, tuple[float, bytes]] = {}  # key -> (expires at, value)
        self.once: dict[tuple[str, str], float] = {}  # publish_once (topic, key) -> expires at
        self.once_sweep_at = 1024  # marks held when the expired ones are next dropped
        self.stats: dict[tuple[str, str], dict[str, int]] = {}  # (topic, group) -> fields
        self.outputs = OutputLogs()  # output logs (append_output), by key
        self.traces = TraceRecords()  # runs' trace records (ack with trace=)
        self._changed = anyio.Event()
        self._tiebreak = itertools.count()

    def now(self) -> float:
        return time.monotonic() + self.offset

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self, timeout: float) -> None:
        changed = self._changed
        with anyio.move_on_after(max(0.0, timeout)):
            await changed.wait()

    def topic(self, name: str) -> TopicState:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = TopicState()
        return topic

    def append(self, name: str, data: bytes) -> None:
        topic = self.topic(name)
        topic.entries.append((topic.next_seq, data, time.time()))
        topic.next_seq += 1
        self._trim(topic)

    def _trim(self, topic: TopicState) -> None:
        # Beyond maxlen, drop the oldest entries, but only those every group has read:
        # the memory bus never loses an entry a group has yet to see.
        floor = min((g.cursor for g in topic.groups.values()), default=topic.next_seq)
        while len(topic.entries) > self.maxlen and topic.entries[0][0] < floor:
            topic.entries.popleft()

    def schedule(self, group: Group, due: float, data: bytes, attempt: int) -> None:
        heapq.heappush(group.scheduled, (due, next(self._tiebreak), data, attempt))

    def next_due(self) -> float | None:
        dues = [
            g.scheduled[0][0]
            for t in self.topics.values()
            for g in t.groups.values()
            if g.scheduled
        ]
        dues += [t.delayed[0][0] for t in self.topics.values() if t.delayed]
        return min(dues, default=None)

    def delay(self, name: str, data: bytes, seconds: float) -> None:
        topic = self.topic(name)
        heapq.heappush(topic.delayed, (self.now() + seconds, next(self._tiebreak), data))

    def release_due(self, topic: TopicState) -> None:
        """Append the topic's delayed entries whose time has come."""
        now = self.now()
        while topic.delayed and topic.delayed[0][0] <= now:
            _, _, data = heapq.heappop(topic.delayed)
            topic.entries.append((topic.next_seq, data, time.time()))
            topic.next_seq += 1

    def busy(self, *, pending: bool = True) -> bool:
        """True while any group has unread entries, due retries, or (with `pending`)
        pending deliveries."""
        now = self.now()
        for topic in self.topics.values():
            if topic.delayed and topic.delayed[0][0] <= now and topic.groups:
                return True
            for group in topic.groups.values():
                if group.cursor < topic.next_seq or (pending and group.pending):
                    return True
                if group.scheduled and group.scheduled[0][0] <= now:
                    return True
        return False


BUSES: weakref.WeakValueDictionary[str, Bus] = weakref.WeakValueDictionary()
