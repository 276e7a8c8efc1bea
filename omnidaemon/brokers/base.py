"""The broker contract: everything omnidaemon needs from an event bus.

A broker moves opaque bytes. It knows topics, consumer groups (one per agent), consumers (one
per worker process and agent), pending deliveries, per-group retries and per-group dead letters;
it knows nothing about envelopes, payload types, apps or workers. Every implementation keeps the
same promises, checked by one conformance suite:

- **Fan-out and load sharing.** Every group subscribed to a topic gets every entry published
  after the group's start point; within one group, each entry is delivered to one consumer.
- **At least once.** A delivered entry stays *pending* for its group until `ack`, `retry` or
  `dead_letter` settles it. A pending entry whose lease is not renewed (`extend`) for
  `min_idle` seconds can be taken over by another consumer (`reclaim`); that counts as a new
  attempt.
- **Per-group retries.** `retry` settles the delivery and schedules a new delivery of the same
  bytes to the same group only, after a delay, with `attempt + 1`. Settling and scheduling are
  one atomic step; so are settling and dead-lettering in `dead_letter`.
- **Settling reports.** `retry` and `dead_letter` return whether they settled the delivery: a
  delivery that another consumer took over (its lease ran out) is settled by that consumer
  only, and the one that lost it must report nothing. `extend` reports the deliveries a
  consumer lost that way.
- **Cancellation.** Any call may be cancelled. A cancelled `fetch` may leave entries pending
  for the consumer, never lose them; `recover` hands them back to the same consumer without
  counting an attempt.
- **A bus that lost its data** (restarted empty, failed over to an empty replica) is met by
  recreating the group from any call that finds it missing, never by failing forever.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from omnidaemon.brokers.inspection import ConsumerInfo, GroupInfo, NodeInfo, TopicInfo
from omnidaemon.brokers.stores import OutputStore, ResultStore, ValueStore
from omnidaemon.brokers.traces import TraceStore, TraceWrite

__all__ = [
    "Broker",
    "ConsumerInfo",
    "Delivery",
    "GroupInfo",
    "NodeInfo",
    "Reclaimed",
    "Renewal",
    "Subscription",
    "TopicInfo",
]


@dataclass(frozen=True, slots=True)
class Subscription:
    """One consumer group on one topic: the broker's view of an agent.

    Attributes:
        topic: The topic the group reads.
        group: The group's name (the agent's name).
        start: Where a newly created group starts reading: `"earliest"` (the oldest entry the
            topic still retains, so events published before the first worker started are
            handled) or `"latest"` (only entries published after the group was created).
    """

    topic: str
    group: str
    start: Literal["earliest", "latest"] = "earliest"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of one entry to one consumer of a group.

    Attributes:
        id: The broker's id of the delivered entry, unique within `origin`.
        data: The entry's bytes, exactly as published.
        attempt: 1 for the first delivery to this group, plus one per retry and per reclaim.
        origin: Which of the subscription's queues the entry came from (broker-specific; pass
            the delivery back unchanged to settle it).
        consumer: The consumer it was delivered to: a settle succeeds only while that
            consumer still holds it (empty: whoever holds it).
    """

    id: str
    data: bytes
    attempt: int
    origin: str = ""
    consumer: str = ""


class Reclaimed(list[Delivery]):
    """What `Broker.reclaim` took over: the deliveries, plus `held_back`, the number of idle
    deliveries it left where they were because they would have been taken over as the
    `hold_back` attempt."""

    held_back: int = 0


@dataclass(frozen=True, slots=True)
class Renewal:
    """What `Broker.extend` found.

    Attributes:
        lost: Deliveries the consumer no longer holds: another consumer took them over after
            their lease ran out (or they were settled). Their outcome is that consumer's to
            report.
        trimmed: Deliveries still held whose entries the bus no longer has (trimmed from the
            topic while their handlers ran, or lost with the bus's data): nothing is left to
            deliver again, so the caller's copy is the only one; settle them with
            `trimmed=True`.
    """

    lost: tuple[Delivery, ...] = ()
    trimmed: tuple[Delivery, ...] = ()


class Broker(TraceStore, ResultStore, OutputStore, ValueStore, ABC):
    """An event bus that omnidaemon runs on.

    Use it as an async context manager, or call `connect` and `close`. Every method except
    `connect` may be called only while connected.
    """

    waits_unread: bool = True
    """Whether a consume loop may leave events unread while it waits (for a rate limit): on
    a bus whose clock is a test's, only what the bus schedules moves with that clock."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The broker's URL with any password masked: safe to log."""

    @abstractmethod
    async def connect(self) -> None:
        """Open connections. Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Close connections. Idempotent; pending deliveries stay pending."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def clone(self) -> Broker:
        """A new, unconnected broker on the same bus, for use on another event loop.

        Raises:
            ConfigurationError: this bus cannot be reached from another event loop.
        """
        from omnidaemon.errors import ConfigurationError

        raise ConfigurationError(
            f"{type(self).__name__} cannot be used from another thread's event loop; "
            "publish_sync needs a bus other processes can reach (Redis or the embedded bus)"
        )

    # Publishing ---------------------------------------------------------------------------

    @abstractmethod
    async def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        """Append one entry to `topic`; durable when this returns.

        With `delay` > 0 the entry is held, durably, and appended `delay` seconds from now by
        the bus's clock (wall-clock time, so a delay survives restarts of every process; the
        bus's, so a publisher whose clock is off still gets the delay it asked for).
        """

    async def publish_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Append several `(topic, data)` entries, in order; a broker may pipeline them."""
        for topic, data in entries:
            await self.publish(topic, data)

    async def publish_once(self, topic: str, data: bytes, key: str, *, window: float) -> bool:
        """Append one entry to `topic` unless an entry was appended with the same `key` in
        the last `window` seconds; returns whether this call appended it.

        What a fleet uses to publish something exactly once although any of its processes
        may try, and may die while trying (a schedule's tick, a debounced burst): the one
        that takes over repeats the call with the same key. A bus that can makes the check
        and the append one atomic step (Redis and the embedded bus: a script; NATS
        JetStream: the stream's de-duplication by message id; memory). The default checks,
        appends, then marks the key: concurrent calls, or a crash between the append and
        the mark, may append twice, never zero times (at least once, like every delivery).

        A key counts per topic. On NATS the stream's de-duplication window (two minutes)
        rules: a shorter `window` holds the key for two minutes all the same, and past two
        minutes a longer one is held by a mark written after the append (see
        `omnidaemon.brokers.nats._publishing`).
        """
        mark = f"once:{topic}:{key}"
        if await self.get_value(mark) is not None:
            return False
        await self.publish(topic, data)
        await self.set_value(mark, b"1", window)
        return True

    @abstractmethod
    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        """Append one entry to `topic` only if the topic exists (it was subscribed to and not
        deleted since), as one atomic step; returns whether it was appended.

        Replies to a request-reply topic go through here: the topic lives only while its
        request waits, and a reply that comes later (a second agent's, or one after the
        timeout) must not bring the topic back with nobody left to delete it.
        """

    # Consuming ----------------------------------------------------------------------------

    @abstractmethod
    async def subscribe(self, sub: Subscription) -> None:
        """Create the consumer group if it does not exist. Idempotent."""

    async def remove_consumer(self, sub: Subscription, consumer: str) -> bool:
        """Remove `consumer` from the group if it holds nothing pending (a graceful stop), in
        one atomic step with that check: its pending deliveries are never dropped. Returns
        whether the group no longer lists it.

        The default removes nothing, for buses that cannot: a consumer the bus keeps listing
        is harmless.
        """
        return False

    async def prune_consumers(
        self,
        sub: Subscription,
        min_idle: float,
        *,
        alive: Callable[[str], Awaitable[bool]] | None = None,
    ) -> list[str]:
        """Remove the group's consumers that hold nothing pending and have been idle for
        longer than `min_idle` seconds (workers that died; their deliveries were taken over),
        each atomically with that check. Returns the names removed.

        `alive` (a consumer's name -> whether its worker still lives) spares the consumers of
        live workers: some buses count a consumer idle from its last delivery, so a live
        worker that was handed nothing for a while looks idle too. A live consumer removed
        anyway loses nothing: the bus lists it again once it reads. The default removes
        nothing.
        """
        return []

    @abstractmethod
    async def fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        """Deliver up to `count` entries to `consumer`: retries that are due first, then new
        entries. Waits up to `timeout` seconds for at least one; returns `[]` if none came."""

    @abstractmethod
    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        """Make a `fetch` of `consumer` that is waiting for entries return now, with whatever
        it was handed (a graceful stop uses it instead of cancelling the fetch, which could
        leave delivered entries pending). A fetch not waiting yet may ignore it."""

    @abstractmethod
    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        """Settle deliveries as done. Acking an already settled delivery is a no-op.

        `stats` are increments of the group's metrics (see `omnidaemon.metrics`), written in
        the same round trip, except the extremes (`omnidaemon.metrics.is_extreme`): a
        `...:min_us` field keeps the smaller of its value and the one given, any other the
        larger. `trace` are records of runs to store (see `omnidaemon.brokers.traces`), in
        the same round trip where the bus allows it (a cluster sends one to each node that
        holds some, all at once). `deliveries` may be empty to write only them.

        Raises:
            TraceNotWritten: the deliveries were settled and the counts written, but the trace
                records were not (kept by the caller, to write again).
        """

    @abstractmethod
    async def retry(
        self,
        sub: Subscription,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        """Atomically settle `delivery` and schedule its entry for this group alone, `delay`
        seconds from now (by the bus's clock), as attempt `delivery.attempt + 1` (or `attempt`:
        the same attempt defers a delivery without charging it).

        Returns False, and schedules nothing, when the consumer no longer held the delivery
        (another consumer took it over). `trimmed` (see `Renewal.trimmed`) schedules the
        entry from `delivery.data` even though the bus holds nothing pending for it.
        """

    @abstractmethod
    async def dead_letter(
        self, sub: Subscription, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        """Atomically settle `delivery` and append `record` to the group's dead-letter queue.

        Returns False, and appends nothing, when the consumer no longer held the delivery;
        `trimmed` as in `retry`.
        """

    @abstractmethod
    async def extend(
        self, sub: Subscription, consumer: str, deliveries: Sequence[Delivery]
    ) -> Renewal:
        """Renew the lease of deliveries `consumer` is still working on, so that they are not
        reclaimed while it is alive; report those it lost or whose entries were trimmed."""

    @abstractmethod
    async def reclaim(
        self,
        sub: Subscription,
        consumer: str,
        min_idle: float,
        count: int,
        *,
        hold_back: int | None = None,
    ) -> Reclaimed:
        """Take over up to `count` pending deliveries whose lease is older than `min_idle`
        seconds (their consumer is presumed dead), each as a new attempt, however many
        deliveries held by live consumers come before them.

        With `hold_back`, a delivery that would be taken over as exactly that attempt is left
        pending and counted in the result's `held_back`.
        """

    @abstractmethod
    async def recover(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        """Up to `count` deliveries `consumer` holds, as they were delivered (same attempt;
        nothing is counted): what a fetch handed out when its reply never reached the caller."""

    @abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Remove a topic with everything it holds: entries, groups, retries, dead letters.

        Touches only the topic's own keys: its cost does not grow with the rest of the bus.
        """

    @abstractmethod
    async def purge_backlog(self, topic: str) -> int:
        """Drop what the topic holds for its groups, but keep the groups: its entries, its
        delayed events, and per group the deliveries pending and the retries scheduled.

        Each group is left at the end of the (now empty) stream, so the events published
        afterwards reach every agent as before; dead letters and metrics are kept (see
        `purge_dead_letters`). A handler still running a dropped delivery settles nothing
        when it ends. Returns how many entries the topic held (0 for no such topic).
        """

    @abstractmethod
    async def expire_topic(self, topic: str, ttl: float) -> None:
        """Have the bus remove the topic with everything it holds `ttl` seconds from now,
        even if no process of ours is left to call `delete_topic`.

        Covers what the topic holds when called (call it after `subscribe`); entries appended
        later keep the same deadline. A bus that lives and dies with its process (`memory://`)
        may do nothing.
        """

    def clock(self) -> float:
        """Seconds since the epoch, as flow control measures time (rate limits, budgets,
        leases of concurrency slots): the worker's wall clock, which must agree across the
        fleet within what the limits can tolerate (NTP). The in-memory bus's moves with its
        test clock."""
        return time.time()

    # Inspection ---------------------------------------------------------------------------

    @abstractmethod
    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        """Move dead letters back to the group, as new first attempts, for this group alone.

        `select` sees each record's id and data (as `dead_letters` returns them) and returns
        the entry bytes to deliver again, or `None` to leave the record where it is. Moving
        one record is one atomic step, and a record is moved at most once even when several
        replays run at the same time. Returns how many this call moved.
        """

    @abstractmethod
    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        """The `limit` most recent records of the group's dead-letter queue as `(record id,
        record)`, oldest first. The id names the record to an operator; a record the bus holds
        in a form that has no record data (written into it by hand) comes with empty data, so
        that it is reported rather than hidden."""

    async def ping(self) -> None:
        """Check the bus answers; raises when it does not."""
        await self.topics()

    async def server_info(self) -> dict[str, str]:
        """What the bus's server says of itself (kind, version, memory), for operators."""
        return {}

    async def nodes(self) -> list[NodeInfo]:
        """The servers of a bus made of several (a cluster's masters and replicas, with the
        topics each master serves); empty for a bus of one server."""
        return []

    @abstractmethod
    async def topics(self) -> list[str]:
        """The names of every topic on the bus, sorted."""

    @abstractmethod
    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        """A topic's length, delayed entries and groups (with each group's consumers when
        `consumers`), or `None` if the bus has no such topic."""

    @abstractmethod
    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        """The topic's `limit` most recent entries as `(id, data)`, oldest first."""

    @abstractmethod
    async def purge_dead_letters(self, sub: Subscription) -> int:
        """Remove every record of the group's dead-letter queue; returns how many there were."""

    @abstractmethod
    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        """Every group's metrics fields (the sums of every `ack(stats=...)`), by
        `(topic, group)`."""
