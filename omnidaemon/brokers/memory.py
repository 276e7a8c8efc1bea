"""`memory://`: an in-process bus with the delivery semantics of the real one.

It backs `omnidaemon.testing` and single-process runs. Entries never leave the process: a
publisher in another process cannot reach it. Brokers opened on the same `memory://NAME` URL in
one process share one bus.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from omnidaemon.brokers._memory_output import OutputLogs, parse_memory_id
from omnidaemon.brokers._memory_traces import TraceRecords
from omnidaemon.brokers.base import (
    Broker,
    ConsumerInfo,
    Delivery,
    GroupInfo,
    R,
    Reclaimed,
    Renewal,
    Subscription,
    TopicInfo,
)
from omnidaemon.brokers.traces import StoredTrace, TraceWrite
from omnidaemon.metrics import is_extreme

__all__ = ["MemoryBroker"]

_STREAM = "stream"
_RETRY = "retry"


@dataclass(slots=True)
class _Pending:
    delivery: Delivery
    consumer: str
    leased_at: float
    # Wall-clock seconds the entry entered the queue it was delivered from: published (topic
    # entries) or handed out (retries, like Redis's retry stream), for `oldest_pending_age`.
    queued_at: float = 0.0


@dataclass(slots=True)
class _Group:
    cursor: int
    pending: dict[tuple[str, str], _Pending] = field(default_factory=dict)
    # consumer -> when it last fetched or renewed anything
    consumers: dict[str, float] = field(default_factory=dict)
    # (due, tiebreak, data, attempt): a heap ordered by due time.
    scheduled: list[tuple[float, int, bytes, int]] = field(default_factory=list)
    # (record id, record); ids count up per group, as a stream's would.
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    dead_seq: int = 0


@dataclass(slots=True)
class _Topic:
    # (sequence number, data, published at in wall-clock seconds)
    entries: deque[tuple[int, bytes, float]] = field(default_factory=deque)
    next_seq: int = 0
    groups: dict[str, _Group] = field(default_factory=dict)
    # (due, tiebreak, data): delayed publishes, appended to `entries` when due.
    delayed: list[tuple[float, int, bytes]] = field(default_factory=list)


class _Bus:
    """The shared state behind every `MemoryBroker` opened on one name."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.topics: dict[str, _Topic] = {}
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

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic()
        return topic

    def append(self, name: str, data: bytes) -> None:
        topic = self.topic(name)
        topic.entries.append((topic.next_seq, data, time.time()))
        topic.next_seq += 1
        self._trim(topic)

    def _trim(self, topic: _Topic) -> None:
        # Beyond maxlen, drop the oldest entries, but only those every group has read:
        # the memory bus never loses an entry a group has yet to see.
        floor = min((g.cursor for g in topic.groups.values()), default=topic.next_seq)
        while len(topic.entries) > self.maxlen and topic.entries[0][0] < floor:
            topic.entries.popleft()

    def schedule(self, group: _Group, due: float, data: bytes, attempt: int) -> None:
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

    def release_due(self, topic: _Topic) -> None:
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


_buses: weakref.WeakValueDictionary[str, _Bus] = weakref.WeakValueDictionary()


class MemoryBroker(Broker):
    """The in-process broker.

    Args:
        name: Brokers with the same name in one process share one bus; `None` makes a private
            bus for this broker alone.
        maxlen: Entries each topic retains once every group has read them.
    """

    def __init__(self, name: str | None = None, *, maxlen: int = 10_000) -> None:
        self._name = name
        if name is None:
            self._bus = _Bus(maxlen)
        else:
            bus = _buses.get(name)
            if bus is None:
                bus = _Bus(maxlen)
                _buses[name] = bus
            self._bus = bus
        self._ids = itertools.count()
        self._interrupted: set[tuple[Subscription, str]] = set()

    @property
    def url(self) -> str:
        return f"memory://{self._name or ''}"

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # Publishing ---------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        self.publish_nowait(topic, data, delay=delay)
        await anyio.lowlevel.checkpoint()

    def publish_nowait(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        """`publish` in one step, for code on the bus's event loop thread that cannot await
        (`App.publish_sync` called by a test under `omnidaemon.testing`)."""
        if delay > 0:
            self._bus.delay(topic, data, delay)
        else:
            self._bus.append(topic, data)
        self._bus.notify()

    async def publish_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        for topic, data in entries:
            self._bus.append(topic, data)
        self._bus.notify()
        await anyio.lowlevel.checkpoint()

    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        # Checked and appended with no await in between: atomic on this single-threaded bus.
        appended = topic in self._bus.topics
        if appended:
            self._bus.append(topic, data)
            self._bus.notify()
        await anyio.lowlevel.checkpoint()
        return appended

    async def publish_once(self, topic: str, data: bytes, key: str, *, window: float) -> bool:
        # Checked, appended and marked with no await in between: atomic on this bus. Marks
        # expire by the bus's clock, so `advance` moves them on as it does values.
        bus, now = self._bus, self._bus.now()
        if len(bus.once) >= bus.once_sweep_at:  # drop expired marks, amortised O(1) a call
            bus.once = {k: until for k, until in bus.once.items() if until > now}
            bus.once_sweep_at = max(1024, 2 * len(bus.once))
        appended = bus.once.get((topic, key), 0.0) <= now
        if appended:
            bus.once[(topic, key)] = now + window
            self.publish_nowait(topic, data)  # through here, so that TestApp records it
        await anyio.lowlevel.checkpoint()
        return appended

    # Consuming ----------------------------------------------------------------------------

    def _group(self, sub: Subscription) -> _Group:
        try:
            return self._bus.topics[sub.topic].groups[sub.group]
        except KeyError:
            raise RuntimeError(f"not subscribed: {sub.group!r} on {sub.topic!r}") from None

    async def subscribe(self, sub: Subscription) -> None:
        topic = self._bus.topic(sub.topic)
        if sub.group not in topic.groups:
            start = topic.entries[0][0] if topic.entries else topic.next_seq
            if sub.start == "latest":
                start = topic.next_seq
            topic.groups[sub.group] = _Group(cursor=start)
        await anyio.lowlevel.checkpoint()

    def _holds(self, group: _Group, consumer: str) -> bool:
        return any(p.consumer == consumer for p in group.pending.values())

    async def remove_consumer(self, sub: Subscription, consumer: str) -> bool:
        # No await between the check and the removal: nothing can become pending in between.
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        if group is not None and consumer in group.consumers:
            if self._holds(group, consumer):
                await anyio.lowlevel.checkpoint()
                return False
            del group.consumers[consumer]
        await anyio.lowlevel.checkpoint()
        return True

    async def prune_consumers(
        self,
        sub: Subscription,
        min_idle: float,
        *,
        alive: Callable[[str], Awaitable[bool]] | None = None,
    ) -> list[str]:
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        await anyio.lowlevel.checkpoint()
        if group is None:
            return []
        now = self._bus.now()
        idle = sorted(c for c, seen in group.consumers.items() if now - seen > min_idle)
        return [
            c
            for c in idle
            if (alive is None or not await alive(c)) and await self.remove_consumer(sub, c)
        ]

    async def fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        bus = self._bus
        deadline = bus.now() + timeout
        self._interrupted.discard((sub, consumer))
        while True:
            taken = self._take(sub, consumer, count)
            if taken:
                # No await between taking and returning: a cancelled fetch loses nothing.
                return taken
            now = bus.now()
            if now >= deadline or (sub, consumer) in self._interrupted:
                self._interrupted.discard((sub, consumer))
                return []
            group, topic = self._group(sub), bus.topics[sub.topic]
            wake = deadline if not group.scheduled else min(deadline, group.scheduled[0][0])
            if topic.delayed:
                wake = min(wake, topic.delayed[0][0])
            await bus.wait_changed(wake - now)

    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        self._interrupted.add((sub, consumer))
        self._bus.notify()
        await anyio.lowlevel.checkpoint()

    def _take(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        bus = self._bus
        topic = bus.topics[sub.topic]
        group = self._group(sub)
        bus.release_due(topic)
        now, wall = bus.now(), time.time()
        taken: list[tuple[Delivery, float]] = []
        while group.scheduled and group.scheduled[0][0] <= now and len(taken) < count:
            _, _, data, attempt = heapq.heappop(group.scheduled)
            retry = Delivery(f"r-{next(self._ids)}", data, attempt, _RETRY, consumer)
            taken.append((retry, wall))
        if len(taken) < count and group.cursor < topic.next_seq:
            # Sequence numbers are contiguous, so the cursor maps straight to a position.
            index = max(0, group.cursor - topic.entries[0][0])
            while index < len(topic.entries) and len(taken) < count:
                seq, data, published = topic.entries[index]
                taken.append((Delivery(str(seq), data, 1, _STREAM, consumer), published))
                group.cursor = seq + 1
                index += 1
        for delivery, queued_at in taken:
            key = (delivery.origin, delivery.id)
            group.pending[key] = _Pending(delivery, consumer, now, queued_at)
        group.consumers[consumer] = now
        return [delivery for delivery, _ in taken]

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        group = self._group(sub)
        for delivery in deliveries:
            group.pending.pop((delivery.origin, delivery.id), None)
        if trace:
            self._bus.traces.write(trace, self._bus.now())
        if stats:
            fields = self._bus.stats.setdefault((sub.topic, sub.group), {})
            for name, value in stats.items():
                if not is_extreme(name):
                    fields[name] = fields.get(name, 0) + value
                elif name not in fields:
                    fields[name] = value
                else:
                    keep = min if name.endswith(":min_us") else max
                    fields[name] = keep(fields[name], value)
        self._bus.notify()
        await anyio.lowlevel.checkpoint()

    async def retry(
        self,
        sub: Subscription,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        group = self._group(sub)
        settled = self._settle(group, delivery)
        if settled or trimmed:
            due = self._bus.now() + max(0.0, delay)
            next_attempt = delivery.attempt + 1 if attempt is None else attempt
            self._bus.schedule(group, due, delivery.data, next_attempt)
        self._bus.notify()
        await anyio.lowlevel.checkpoint()
        return settled or trimmed

    async def dead_letter(
        self, sub: Subscription, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        group = self._group(sub)
        settled = self._settle(group, delivery)
        if settled or trimmed:
            group.dead.append((str(group.dead_seq), record))
            group.dead_seq += 1
        self._bus.notify()
        await anyio.lowlevel.checkpoint()
        return settled or trimmed

    @staticmethod
    def _settle(group: _Group, delivery: Delivery) -> bool:
        """Remove the delivery from the pending ones if its consumer still holds it."""
        key = (delivery.origin, delivery.id)
        pending = group.pending.get(key)
        if pending is None or (delivery.consumer and pending.consumer != delivery.consumer):
            return False
        del group.pending[key]
        return True

    async def extend(
        self, sub: Subscription, consumer: str, deliveries: Sequence[Delivery]
    ) -> Renewal:
        group = self._group(sub)
        now = self._bus.now()
        group.consumers[consumer] = now
        lost = []
        for delivery in deliveries:
            pending = group.pending.get((delivery.origin, delivery.id))
            if pending is not None and pending.consumer == consumer:
                pending.leased_at = now
            else:
                lost.append(delivery)
        await anyio.lowlevel.checkpoint()
        # The memory bus trims only entries every group has settled: nothing pending is trimmed.
        return Renewal(lost=tuple(lost))

    async def reclaim(
        self,
        sub: Subscription,
        consumer: str,
        min_idle: float,
        count: int,
        *,
        hold_back: int | None = None,
    ) -> Reclaimed:
        group = self._group(sub)
        now = self._bus.now()
        claimed = Reclaimed()
        for pending in group.pending.values():
            if len(claimed) >= count:
                break
            if now - pending.leased_at >= min_idle:
                old = pending.delivery
                if old.attempt + 1 == hold_back:
                    claimed.held_back += 1
                    continue
                pending.delivery = Delivery(old.id, old.data, old.attempt + 1, old.origin, consumer)
                pending.consumer = consumer
                pending.leased_at = now
                claimed.append(pending.delivery)
        if claimed:  # like XAUTOCLAIM: the group lists the consumer that took them over
            group.consumers[consumer] = now
        await anyio.lowlevel.checkpoint()
        return claimed

    async def recover(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        await anyio.lowlevel.checkpoint()
        group = self._group(sub)
        held = [p.delivery for p in group.pending.values() if p.consumer == consumer]
        return held[:count]

    async def delete_topic(self, topic: str) -> None:
        self._bus.topics.pop(topic, None)
        for key in [key for key in self._bus.stats if key[0] == topic]:
            del self._bus.stats[key]
        self._bus.notify()
        await anyio.lowlevel.checkpoint()

    async def purge_backlog(self, topic: str) -> int:
        await anyio.lowlevel.checkpoint()
        state = self._bus.topics.get(topic)
        if state is None:
            return 0
        removed = len(state.entries)
        state.entries.clear()
        state.delayed.clear()
        for group in state.groups.values():
            group.cursor = state.next_seq
            group.pending.clear()
            group.scheduled.clear()
        self._bus.notify()
        return removed

    async def expire_topic(self, topic: str, ttl: float) -> None:
        # Nothing to do: the bus lives in this process, so a requester that dies takes its
        # topics with it; one that lives deletes them (App.request does, whatever happens).
        await anyio.lowlevel.checkpoint()

    # Results ------------------------------------------------------------------------------

    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        bus = self._bus
        _, records = bus.results.get(event_id, (0.0, {}))
        records[agent] = record
        bus.results[event_id] = (bus.now() + ttl, records)
        bus.notify()
        await anyio.lowlevel.checkpoint()

    async def get_results(self, event_id: str) -> dict[str, bytes]:
        await anyio.lowlevel.checkpoint()
        expires, records = self._bus.results.get(event_id, (0.0, {}))
        if expires <= self._bus.now():
            self._bus.results.pop(event_id, None)
            return {}
        return dict(records)

    # Output logs --------------------------------------------------------------------------

    async def append_output(self, key: str, data: bytes, *, ttl: float) -> str:
        bus = self._bus
        entry_id = bus.outputs.append(key, data, ttl, bus.now())
        bus.notify()  # wakes the readers waiting in read_output
        await anyio.lowlevel.checkpoint()
        return entry_id

    async def read_output(
        self, key: str, *, after: str | None = None, count: int = 100, timeout: float = 0.0
    ) -> list[tuple[str, bytes]]:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        seq = 0 if after is None else parse_memory_id(after)
        bus = self._bus
        deadline = bus.now() + timeout
        while True:
            found = bus.outputs.read(key, seq, count, bus.now())
            left = deadline - bus.now()
            if found or left <= 0:
                await anyio.lowlevel.checkpoint()
                return found
            await bus.wait_changed(left)

    async def delete_output(self, key: str) -> None:
        self._bus.outputs.delete(key)
        await anyio.lowlevel.checkpoint()

    # Traces -------------------------------------------------------------------------------

    async def read_trace(self, run_id: str) -> StoredTrace | None:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.read(run_id, self._bus.now())

    async def run_of(self, event_id: str) -> str | None:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.run_of(event_id, self._bus.now())

    async def recent_runs(self, *, since: float, limit: int) -> list[tuple[str, float]]:
        await anyio.lowlevel.checkpoint()
        return self._bus.traces.recent(since, limit, self._bus.now())

    # Keys and values ----------------------------------------------------------------------

    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        if only_if_absent and self._value(key) is not None:
            return False
        self._bus.values[key] = (self._bus.now() + ttl, value)
        return True

    async def get_value(self, key: str) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        return self._value(key)

    async def delete_value(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._bus.values.pop(key, None)

    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        await anyio.lowlevel.checkpoint()
        if self._value(key) != expected:
            return False
        if value is None:
            self._bus.values.pop(key, None)
        else:
            self._bus.values[key] = (self._bus.now() + ttl, value)
        return True

    async def update_value(
        self,
        key: str,
        update: Callable[[bytes | None], tuple[bytes, float, R]],
        *,
        guess: bytes | None = None,
    ) -> R:
        # One step, with no await between the read and the write: atomic on this bus.
        await anyio.lowlevel.checkpoint()
        new, ttl, answer = update(self._value(key))
        self._bus.values[key] = (self._bus.now() + ttl, new)
        return answer

    # `TestApp` moves this bus's clock to its next scheduled entry: events a rate limit holds
    # back must be scheduled (put back) to wait on that clock, not left unread.
    waits_unread = False

    def clock(self) -> float:
        return time.time() + self._bus.offset

    def _value(self, key: str) -> bytes | None:
        expires, value = self._bus.values.get(key, (0.0, b""))
        if expires <= self._bus.now():
            self._bus.values.pop(key, None)
            return None
        return value

    # Inspection ---------------------------------------------------------------------------

    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        await anyio.lowlevel.checkpoint()
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        if group is None:
            return 0
        # From here on no await: the records are read and moved in one step of this
        # single-threaded bus, so replays running at once never move a record twice.
        kept: list[tuple[str, bytes]] = []
        moved = 0
        now = self._bus.now()
        for record_id, record in group.dead:
            entry = select(record_id, record)
            if entry is None:
                kept.append((record_id, record))
            else:
                self._bus.schedule(group, now, entry, 1)
                moved += 1
        group.dead = kept
        self._bus.notify()
        return moved

    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        await anyio.lowlevel.checkpoint()
        return self.dead_letters_now(sub)[-limit:] if limit > 0 else []

    def dead_letters_now(self, sub: Subscription) -> list[tuple[str, bytes]]:
        """Every `(record id, record)` in the group's dead-letter queue, oldest first (no
        await needed)."""
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        return list(group.dead) if group else []

    async def server_info(self) -> dict[str, str]:
        await anyio.lowlevel.checkpoint()
        return {"server": "in-process memory bus"}

    async def topics(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return sorted(self._bus.topics)

    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        await anyio.lowlevel.checkpoint()
        bus = self._bus
        state = bus.topics.get(topic)
        if state is None:
            return None
        now, wall = bus.now(), time.time()
        groups = []
        for name, group in sorted(state.groups.items()):
            ages = [max(0.0, wall - p.queued_at) for p in group.pending.values()]
            details = tuple(
                ConsumerInfo(
                    consumer,
                    sum(1 for p in group.pending.values() if p.consumer == consumer),
                    max(0.0, now - seen),
                )
                for consumer, seen in sorted(group.consumers.items())
            )
            groups.append(
                GroupInfo(
                    topic=topic,
                    group=name,
                    consumers=len(group.consumers),
                    pending=len(group.pending),
                    lag=state.next_seq - group.cursor,
                    retries=len(group.scheduled),
                    dead_letters=len(group.dead),
                    oldest_pending_age=max(ages) if ages else None,
                    consumer_details=details if consumers else (),
                )
            )
        delayed_bytes = sum(len(data) for _, _, data in state.delayed)
        return TopicInfo(
            topic, len(state.entries), len(state.delayed), tuple(groups), delayed_bytes
        )

    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        await anyio.lowlevel.checkpoint()
        state = self._bus.topics.get(topic)
        if state is None or limit <= 0:
            return []
        return [(str(seq), data) for seq, data, _ in list(state.entries)[-limit:]]

    async def purge_dead_letters(self, sub: Subscription) -> int:
        await anyio.lowlevel.checkpoint()
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        if group is None:
            return 0
        count, group.dead = len(group.dead), []
        return count

    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        await anyio.lowlevel.checkpoint()
        return {key: dict(fields) for key, fields in self._bus.stats.items()}

    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        await anyio.lowlevel.checkpoint()
        found = {}
        for key in [k for k in self._bus.values if k.startswith(prefix)]:
            value = self._value(key)
            if value is not None:
                found[key] = value
        return found

    # Test support -------------------------------------------------------------------------

    def busy(self) -> bool:
        """True while any group has unread entries, unsettled deliveries or retries now due."""
        return self._bus.busy()

    def queued(self) -> bool:
        """True while any group has unread entries or retries now due (`busy`, less the
        deliveries being handled)."""
        return self._bus.busy(pending=False)

    def pending(self, sub: Subscription) -> int:
        """How many deliveries of the group are unsettled (handed out, not yet settled)."""
        topic = self._bus.topics.get(sub.topic)
        group = topic.groups.get(sub.group) if topic else None
        return len(group.pending) if group else 0

    def has_scheduled(self) -> bool:
        """True while any retry or delayed event is scheduled for later."""
        return self._bus.next_due() is not None

    def fast_forward(self) -> bool:
        """Move this bus's clock to the next scheduled retry, so that it is due now.

        Returns False if no retry is scheduled. Used by `omnidaemon.testing` to run retries
        without waiting out their backoff.
        """
        due = self._bus.next_due()
        if due is None:
            return False
        self._bus.offset += max(0.0, due - self._bus.now())
        self._bus.notify()
        return True

    def advance(self, seconds: float) -> None:
        """Move this bus's clock `seconds` forward: retries, delays and expiries that fall
        due in that time are due now."""
        self._bus.offset += seconds
        self._bus.notify()

    async def wait_changed(self, timeout: float = math.inf) -> None:
        """Wait until anything on the bus changes, or `timeout` seconds."""
        await self._bus.wait_changed(timeout)
