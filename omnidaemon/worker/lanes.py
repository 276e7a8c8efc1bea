"""One agent's queue across its topic's priority lanes (see `omnidaemon.lanes`).

The consume loop talks to an `AgentQueue` where it would talk to the bus about its
subscription: fetch, settle, renew, take over. Until a publisher marks the topic's lanes as
used, the queue is the subscription alone, one call per operation as before. Once it sees the
mark it subscribes the agent's group to the high and low lanes too, and:

- a fetch reads the lanes in order, without waiting, until it has what it asked for; when all
  are empty it waits on all three at once and returns as soon as any has something;
- the order is high, normal, low, except that every 4th fetch starts with normal and every
  16th with low: the guard that keeps a steady stream of high events from starving the others;
- a lane found empty is skipped for the next 50 ms of fetches (but not by a wait): an empty
  high lane costs a round trip per 50 ms, not one per fetch;
- a delivery from a lane carries the lane in its `origin` (`high|...`), so that its settle,
  renewal and takeover go to that lane's subscription. Deliveries of the normal lane are the
  bus's own, unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace

import anyio

from omnidaemon.brokers.base import Broker, Delivery, Reclaimed, Renewal, Subscription
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.brokers.traces import TraceNotWritten, TraceWrite
from omnidaemon.lanes import LANES, Lane, lane_named, lane_topic, lanes_mark_key

__all__ = ["AgentQueue", "lane_of_delivery"]

_LOOK_EVERY = 2.0  # seconds between looks for the topic's lanes mark, until it is seen
_INTERRUPT_EVERY = 0.05  # seconds between tries to end the other lanes' waiting fetches
_NORMAL_FIRST_EVERY = 4  # the starvation guard: this often a fetch starts with normal...
_LOW_FIRST_EVERY = 16  # ... and this often with low
# Seconds a lane found empty is not read again while the others have events: what a high
# event published into a busy topic may wait at most (beyond what the workers have in hand),
# and what keeps an empty lane from costing a round trip per fetch.
_EMPTY_LANE_REST = 0.05
_ORDERS: dict[str, tuple[Lane, ...]] = {
    "high": ("high", "normal", "low"),
    "normal": ("normal", "high", "low"),
    "low": ("low", "high", "normal"),
}


def _tag(lane: Lane, deliveries: Sequence[Delivery]) -> list[Delivery]:
    if lane == "normal":
        return list(deliveries)
    return [replace(d, origin=f"{lane}|{d.origin}") for d in deliveries]


def _untag(delivery: Delivery) -> tuple[Lane, Delivery]:
    # The bus's own origins have no "|": a normal delivery is found without a split.
    if "|" not in delivery.origin:
        return "normal", delivery
    prefix, _, inner = delivery.origin.partition("|")
    lane = lane_named(prefix)
    if lane is None or lane == "normal":
        return "normal", delivery
    return lane, replace(delivery, origin=inner)


def lane_of_delivery(delivery: Delivery) -> Lane:
    """The lane a delivery an `AgentQueue` handed out came from."""
    return _untag(delivery)[0]


class AgentQueue:
    """What one agent's consumer fetches from and settles to: its subscription, plus the
    topic's high and low lanes once they are used."""

    def __init__(self, broker: Broker, subscription: Subscription) -> None:
        self._broker = broker
        self.subscription = subscription
        self._lanes: dict[Lane, Subscription] = {"normal": subscription}
        self._next_look = 0.0
        # The in-process bus costs nothing per lane read: read the lanes from the start (a
        # consumer waiting on its topic alone would not see a first high event there).
        self._eager = isinstance(broker, MemoryBroker)
        self._rest = 0.0 if self._eager else _EMPTY_LANE_REST
        self._empty_until: dict[Lane, float] = {}
        self._fetches = 0

    @property
    def lanes_used(self) -> bool:
        """Whether the agent reads the topic's high and low lanes too."""
        return len(self._lanes) > 1

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The subscriptions the agent reads: its topic's, and its lanes' once used."""
        return tuple(self._lanes.values())

    async def subscribe(self) -> None:
        """Create the agent's consumer group on its topic (and, on the in-memory bus, on the
        topic's lanes, read from the start there)."""
        await self._broker.subscribe(self.subscription)
        if self._eager:
            await self._look()

    async def _look(self) -> None:
        """Subscribe to the lanes once a publisher has marked them as used."""
        now = anyio.current_time()
        if self.lanes_used or now < self._next_look:
            return
        self._next_look = now + _LOOK_EVERY
        sub = self.subscription
        if not self._eager and await self._broker.get_value(lanes_mark_key(sub.topic)) is None:
            return
        lanes: dict[Lane, Subscription] = {"normal": sub}
        for lane in ("high", "low"):
            # From a lane's first entry: its events may predate this group's place in it.
            lanes[lane] = Subscription(lane_topic(sub.topic, lane), sub.group, "earliest")
            await self._broker.subscribe(lanes[lane])
        self._lanes = {lane: lanes[lane] for lane in LANES}

    def _order(self) -> tuple[Lane, ...]:
        self._fetches += 1
        if self._fetches % _LOW_FIRST_EVERY == 0:
            return _ORDERS["low"]
        if self._fetches % _NORMAL_FIRST_EVERY == 0:
            return _ORDERS["normal"]
        return _ORDERS["high"]

    def _by_lane(self, deliveries: Sequence[Delivery]) -> dict[Lane, list[Delivery]]:
        grouped: defaultdict[Lane, list[Delivery]] = defaultdict(list)
        for delivery in deliveries:
            lane, inner = _untag(delivery)
            grouped[lane].append(inner)
        return grouped

    # Taking deliveries ----------------------------------------------------------------------

    async def fetch(self, consumer: str, count: int, timeout: float) -> list[Delivery]:
        """Up to `count` deliveries, higher lanes first (see the module's docs); waits up to
        `timeout` seconds for one. Rarely more than `count`: when two lanes' waits end at once,
        both lanes' deliveries are returned."""
        await self._look()
        if not self.lanes_used:
            return await self._broker.fetch(self.subscription, consumer, count, timeout)
        taken: list[Delivery] = []
        now = anyio.current_time()
        empty_until = self._empty_until
        for lane in self._order():
            if empty_until.get(lane, 0.0) > now:
                continue
            wanted = count - len(taken)
            got = await self._broker.fetch(self._lanes[lane], consumer, wanted, 0.0)
            if len(got) < wanted:
                empty_until[lane] = now + self._rest
            taken += _tag(lane, got)
            if len(taken) >= count:
                return taken
        if taken or timeout <= 0:
            return taken
        empty_until.clear()  # the wait below watches every lane
        return await self._wait_any(consumer, count, timeout)

    async def _wait_any(self, consumer: str, count: int, timeout: float) -> list[Delivery]:
        """Wait on every lane at once; once one has delivered, end the others' waits (they
        return what they were handed, if anything)."""
        got: dict[Lane, list[Delivery]] = {}
        some, every = anyio.Event(), anyio.Event()

        async def wait(lane: Lane) -> None:
            try:
                got[lane] = await self._broker.fetch(self._lanes[lane], consumer, count, timeout)
            finally:
                if got.get(lane) or len(got) == len(self._lanes):
                    some.set()
                if len(got) == len(self._lanes):
                    every.set()

        async def end_the_others() -> None:
            await some.wait()
            # An interrupt that comes before a fetch waits may be ignored: repeat it until
            # every wait has returned (at once, not after a pause, when they all have).
            while not every.is_set():
                for lane, sub in self._lanes.items():
                    if lane not in got:
                        await self._broker.interrupt(sub, consumer)
                with anyio.move_on_after(_INTERRUPT_EVERY):
                    await every.wait()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(end_the_others)
            for lane in self._lanes:
                tasks.start_soon(wait, lane)
        return [d for lane in LANES for d in _tag(lane, got.get(lane, []))]

    async def reclaim(
        self, consumer: str, min_idle: float, count: int, *, hold_back: int | None = None
    ) -> Reclaimed:
        """`Broker.reclaim` over the lanes, higher first."""
        taken = Reclaimed()
        for lane in LANES:
            if lane not in self._lanes or len(taken) >= count:
                continue
            got = await self._broker.reclaim(
                self._lanes[lane], consumer, min_idle, count - len(taken), hold_back=hold_back
            )
            taken += _tag(lane, got)
            taken.held_back += got.held_back
        return taken

    async def recover(self, consumer: str, count: int) -> list[Delivery]:
        """`Broker.recover` over the lanes."""
        held: list[Delivery] = []
        for lane, sub in self._lanes.items():
            held += _tag(lane, await self._broker.recover(sub, consumer, count))
        return held

    async def interrupt(self, consumer: str) -> None:
        """`Broker.interrupt` on every lane."""
        for sub in self._lanes.values():
            await self._broker.interrupt(sub, consumer)

    # Settling -------------------------------------------------------------------------------

    async def ack(
        self,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        """`Broker.ack`; the agent's metrics and trace records go with the normal lane's acks
        (one round trip when every delivery is of one lane)."""
        if not self.lanes_used:
            await self._broker.ack(self.subscription, deliveries, stats=stats, trace=trace)
            return
        grouped = self._by_lane(deliveries)
        unwritten: TraceNotWritten | None = None
        if stats or trace or "normal" in grouped:
            try:
                await self._broker.ack(
                    self.subscription, grouped.pop("normal", []), stats=stats, trace=trace
                )
            except TraceNotWritten as exc:
                unwritten = exc  # the other lanes' acks still go
        for lane, inner in grouped.items():
            await self._broker.ack(self._lanes[lane], inner)
        if unwritten is not None:
            raise unwritten

    async def retry(
        self,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        """`Broker.retry` in the delivery's lane (a retried event keeps its priority)."""
        lane, inner = _untag(delivery)
        return await self._broker.retry(
            self._lanes[lane], inner, delay, attempt=attempt, trimmed=trimmed
        )

    async def dead_letter(
        self, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        """`Broker.dead_letter` in the delivery's lane (inspection merges the lanes' queues)."""
        lane, inner = _untag(delivery)
        return await self._broker.dead_letter(self._lanes[lane], inner, record, trimmed=trimmed)

    async def extend(self, consumer: str, deliveries: Sequence[Delivery]) -> Renewal:
        """`Broker.extend` per lane, with the lanes' findings merged."""
        if not self.lanes_used:
            return await self._broker.extend(self.subscription, consumer, deliveries)
        lost: list[Delivery] = []
        trimmed: list[Delivery] = []
        for lane, inner in self._by_lane(deliveries).items():
            renewal = await self._broker.extend(self._lanes[lane], consumer, inner)
            lost += _tag(lane, renewal.lost)
            trimmed += _tag(lane, renewal.trimmed)
        return Renewal(tuple(lost), tuple(trimmed))

    # Membership -----------------------------------------------------------------------------

    async def remove_consumer(self, consumer: str) -> bool:
        """`Broker.remove_consumer` from every lane's group."""
        removed = [
            await self._broker.remove_consumer(sub, consumer) for sub in self._lanes.values()
        ]
        return all(removed)

    async def prune_consumers(
        self, min_idle: float, *, alive: Callable[[str], Awaitable[bool]] | None = None
    ) -> list[str]:
        """`Broker.prune_consumers` in every lane's group."""
        pruned: list[str] = []
        for sub in self._lanes.values():
            pruned += await self._broker.prune_consumers(sub, min_idle, alive=alive)
        return sorted(set(pruned))
