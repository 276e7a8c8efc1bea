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
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from omnidaemon.brokers._memory_bus import BUSES, Bus, Group, Pending
from omnidaemon.brokers._memory_stores import MemoryStores
from omnidaemon.brokers.base import (
    Delivery,
    Reclaimed,
    Renewal,
    Subscription,
)
from omnidaemon.brokers.traces import TraceWrite
from omnidaemon.metrics import is_extreme

__all__ = ["MemoryBroker"]

_STREAM = "stream"
_RETRY = "retry"


class MemoryBroker(MemoryStores):
    """The in-process broker.

    Args:
        name: Brokers with the same name in one process share one bus; `None` makes a private
            bus for this broker alone.
        maxlen: Entries each topic retains once every group has read them.
    """

    def __init__(self, name: str | None = None, *, maxlen: int = 10_000) -> None:
        self._name = name
        if name is None:
            self._bus = Bus(maxlen)
        else:
            bus = BUSES.get(name)
            if bus is None:
                bus = Bus(maxlen)
                BUSES[name] = bus
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

    def _group(self, sub: Subscription) -> Group:
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
            topic.groups[sub.group] = Group(cursor=start)
        await anyio.lowlevel.checkpoint()

    def _holds(self, group: Group, consumer: str) -> bool:
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
            group.pending[key] = Pending(delivery, consumer, now, queued_at)
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
    def _settle(group: Group, delivery: Delivery) -> bool:
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

    # `TestApp` moves this bus's clock to its next scheduled entry: events a rate limit holds
    # back must be scheduled (put back) to wait on that clock, not left unread.
    waits_unread = False

    def clock(self) -> float:
        return time.time() + self._bus.offset

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
