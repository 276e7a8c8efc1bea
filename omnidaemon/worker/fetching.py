"""The fetching side of an agent's consume loop: taking deliveries from the bus (fetch, reclaim,
recovery of its own unseen deliveries), renewing their leases, and the consumer's place in its
group. `AgentConsumer` inherits it; the handling side is in `consumer.py`."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import anyio

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability.logging import Logger
from omnidaemon.worker.acks import AckBatcher
from omnidaemon.worker.handoff import HandOff
from omnidaemon.worker.heartbeat import worker_alive

if TYPE_CHECKING:
    from omnidaemon.flow.gate import FlowGate
    from omnidaemon.worker.isolation import Isolation
    from omnidaemon.worker.lanes import AgentQueue
    from omnidaemon.worker.threads import TimedThreads

__all__ = ["Fetching"]

_FETCH_TIMEOUT = 2.0  # seconds one fetch may block; bounds how stale the reclaim check gets
# While handlers run, one of them may schedule a retry due sooner than a long fetch would
# return: fetch in shorter slices then, so the retry is picked up on time.
_BUSY_FETCH_TIMEOUT = 0.2
_MAX_RECLAIM_INTERVAL = 5.0
_ORPHANS = 1_000  # at most this many of its own unknown deliveries a consumer takes back at once
_INTERRUPT_EVERY = 0.05  # seconds between tries to end a blocking fetch on a graceful stop
# Consumers of dead workers are pruned from the group at most this often (and once after a
# takeover), when idle for max(_PRUNE_IDLE_RECLAIMS * reclaim_idle, _PRUNE_IDLE_FLOOR): see
# Fetching._prune_consumers.
_PRUNE_INTERVAL = 60.0
_PRUNE_IDLE_RECLAIMS = 3
_PRUNE_IDLE_FLOOR = 10.0  # five fetch timeouts: a live consumer reads far more often
_LEAVE_TIMEOUT = 2.0  # seconds a stopping worker gives the bus to remove its consumer
_MAX_DUE = 10_000  # due times of put-back events a consumer remembers (see _due_at)


def prune_idle(spec: AgentSpec) -> float:
    """Seconds a consumer of the agent's group must be idle, holding nothing, to be pruned."""
    return max(_PRUNE_IDLE_RECLAIMS * spec.reclaim_idle, _PRUNE_IDLE_FLOOR)


class Fetching:
    """Fetching, reclaiming, lease renewal and group membership of one agent in one worker."""

    # Set by AgentConsumer.__init__.
    subscription: Subscription
    consumer: str
    _spec: AgentSpec
    _broker: Broker
    _queue: AgentQueue
    _capacity: int
    _in_flight: dict[tuple[str, str], Delivery]
    _stopping: bool
    _wake: anyio.Event
    _wake_waiting: bool
    _stop_requested: anyio.Event
    _fetching: bool
    _alone: tuple[str, str] | None
    _draining: bool
    _isolation: Isolation
    _recovering: bool
    _lost: set[tuple[str, str]]
    _trimmed: set[tuple[str, str]]
    _acks: AckBatcher
    _threads: TimedThreads | None
    _prune_idle: float
    _next_prune: float
    _log: Logger
    _gate: FlowGate | None
    _due: list[float]
    _paid: set[tuple[str, str]]  # fetched deliveries whose rate-limit start is taken
    metrics: AgentMetrics

    def _due_at(self, wait: float) -> None:
        """An event this consumer put back on the bus is due in `wait` seconds: an idle fetch
        returns by then to pick it up, rather than after its full timeout."""
        if len(self._due) < _MAX_DUE:
            heapq.heappush(self._due, anyio.current_time() + wait)

    def _next_due(self, now: float) -> float:
        due = self._due
        while due and due[0] <= now:
            heapq.heappop(due)
        return due[0] if due else now + _FETCH_TIMEOUT

    async def _wait_wake(self) -> None:
        # Handlers set the event only while someone waits on it: setting it for every
        # finished event costs more than it is worth when nobody is waiting.
        self._wake_waiting = True
        try:
            await self._wake.wait()
        finally:
            self._wake_waiting = False
        self._wake = anyio.Event()

    async def _dispatch(self, ready: HandOff[Delivery]) -> None:
        spec = self._spec
        last = spec.policy.max_attempts
        reclaim_interval = min(spec.reclaim_idle / 2, _MAX_RECLAIM_INTERVAL)
        next_reclaim = 0.0
        failures = 0
        held_back_before = False
        isolation = self._isolation
        while not self._stopping:
            # A thread that outlived its attempt's timeout still holds its slot.
            threads = self._threads
            free = self._capacity - len(self._in_flight) - (threads.abandoned if threads else 0)
            if (
                free <= 0
                or self._alone is not None
                or ((isolation.running_alone or isolation.draining) and self._held())
            ):
                await self._wait_wake()
                continue
            now = anyio.current_time()
            try:
                deliveries: list[Delivery] = []
                if self._recovering:
                    deliveries = await self._orphans()
                    self._recovering = False
                if not deliveries and (now >= next_reclaim or self._draining):
                    # One at a time: a taken-over delivery is charged an attempt, so take over
                    # only what runs now. A busy worker leaves deliveries that would be on
                    # their last attempt (they must run alone); if no idle worker takes one
                    # by the next look, this one asks its worker to stop fetching until idle.
                    async with isolation.claiming:
                        busy = isolation.running_alone or not isolation.idle()
                        hold_back = last if busy and last > 1 else None
                        reclaimed = await self._queue.reclaim(
                            self.consumer,
                            spec.reclaim_idle,
                            1,
                            hold_back=hold_back,
                        )
                        for delivery in reclaimed:
                            # In flight before the lock is let go: `idle()` must see it.
                            self._in_flight[(delivery.origin, delivery.id)] = delivery
                            if delivery.attempt == last and last > 1:
                                # Its worker died while running it: if it kills this one
                                # too, nothing else may be charged an attempt for it.
                                self._alone = (delivery.origin, delivery.id)
                                isolation.running_alone += 1
                    await self._prune_consumers(reclaimed)
                    next_reclaim = now if reclaimed else now + reclaim_interval
                    self._set_draining(bool(reclaimed.held_back) and held_back_before)
                    held_back_before = bool(reclaimed.held_back)
                    deliveries = list(reclaimed)
                    for delivery in deliveries:
                        self._log.warning(
                            "took over an event whose worker stopped renewing it",
                            entry_id=delivery.id,
                            attempt=delivery.attempt,
                        )
                if not deliveries and not self._draining:
                    longest = _BUSY_FETCH_TIMEOUT if self._in_flight else _FETCH_TIMEOUT
                    timeout = max(0.0, min(longest, next_reclaim - now, self._next_due(now) - now))
                    starts = self._gate.starts if self._gate is not None else None
                    if starts is not None and starts.idle:
                        # Nothing came last time: a fetch that waits for events would spend
                        # the starts taken before it. These events ask one by one instead.
                        starts.idle = False
                        starts = None
                    if starts is not None:
                        # The agent-wide rate limit: starts are taken before the fetch, so
                        # events over the limit wait unread on the bus, in order.
                        free, wait, taken = await starts.take(free)
                        if not free:
                            self.metrics.throttled += 1
                            with anyio.move_on_after(min(wait, timeout)):
                                await self._stop_requested.wait()
                            continue
                    self._fetching = True
                    try:
                        deliveries = await self._queue.fetch(self.consumer, free, timeout)
                    finally:
                        self._fetching = False
                    if starts is not None:
                        if starts.fresh(taken):
                            # Rarely more came than asked for (see AgentQueue.fetch).
                            for delivery in deliveries[:free]:
                                self._paid.add((delivery.origin, delivery.id))
                            starts.keep(free - len(deliveries), taken)
                        starts.idle = not deliveries
                    # Else the fetch waited for events: the starts taken before it are spent
                    # (see omnidaemon.flow.starts), and the events ask the limit one by one.
            except Exception as exc:
                failures += 1
                # The fetch's reply may have been lost after the bus handed entries out.
                self._recovering = True
                delay = min(5.0, 0.1 * 2 ** min(failures, 10))
                if failures == 1:
                    self._log.warning(
                        "cannot fetch from the bus; retrying with backoff",
                        error=f"{type(exc).__name__}: {exc}",
                    )
                with anyio.move_on_after(delay):
                    await self._wait_wake()
                continue
            if failures:
                self._log.info("fetching again", after_failures=failures)
                failures = 0
            for delivery in deliveries:
                self._in_flight[(delivery.origin, delivery.id)] = delivery
            if self._alone is not None:
                # Finished work (of every agent of the worker) is acknowledged before the last
                # attempt runs, so that if it kills the worker, nothing finished is delivered
                # (and charged) again.
                await isolation.flush_acks()
            await ready.put_all(deliveries)

    def _held(self) -> bool:
        """Whether worker-wide isolation keeps this consumer from fetching or taking over now:
        a suspect runs, or one waits for the worker to be idle (the consumer waiting for it
        goes on once it is)."""
        isolation = self._isolation
        if isolation.running_alone:
            return True
        return not (self._draining and isolation.idle())

    def _set_draining(self, draining: bool) -> None:
        if draining == self._draining:
            return
        self._draining = draining
        self._isolation.draining += 1 if draining else -1
        if not draining:
            self._isolation.wake_all()

    async def _worker_alive(self, consumer: str) -> bool:
        """Whether the worker of a consumer of the group still lives: its heartbeat is on the
        bus (a consumer is named after its worker)."""
        return consumer == self.consumer or await worker_alive(self._broker, consumer)

    async def _orphans(self) -> list[Delivery]:
        """Deliveries the bus handed this consumer that it never saw (a fetch whose reply was
        lost), as they were delivered: same attempt, nothing charged."""
        # Seen by this worker: running, or finished with their acks not through yet, before
        # the bus answers or after. An ack that lands while `recover` is on its way leaves its
        # delivery in the answer but no longer waiting here: it was handled, not orphaned
        # (taken for an orphan, it ran twice).
        seen = set(self._in_flight) | self._acks.waiting()
        held = await self._queue.recover(self.consumer, _ORPHANS)
        seen |= set(self._in_flight) | self._acks.waiting()
        orphans = [d for d in held if (d.origin, d.id) not in seen]
        if orphans:
            self._log.info("took back events a failed fetch had left pending", count=len(orphans))
        return orphans

    async def _take_back_orphans(self, ready: HandOff[Delivery]) -> None:
        """On a graceful stop: handle, within the grace period, what a fetch left pending."""
        try:
            orphans = await self._orphans()
        except Exception as exc:
            self._log.debug("could not look for orphaned deliveries", error=str(exc))
            return
        for delivery in orphans:
            self._in_flight[(delivery.origin, delivery.id)] = delivery
        await ready.put_all(orphans)

    async def _interrupt_fetch_on_stop(self) -> None:
        await self._stop_requested.wait()
        while True:
            if self._fetching:
                try:
                    await self._queue.interrupt(self.consumer)
                except Exception as exc:
                    self._log.debug("could not interrupt the fetch", error=str(exc))
            await anyio.sleep(_INTERRUPT_EVERY)

    async def _renew_leases(self) -> None:
        interval = self._spec.reclaim_idle / 3
        failures = 0
        while True:
            await anyio.sleep(interval)
            # Finished deliveries whose acks are not through yet too: an ack that waits for
            # replicas (min_replicas) may take up to publish_timeout, and a delivery left
            # unrenewed that long would be taken over and run again by another worker.
            held = [*self._in_flight.values(), *self._acks.unsettled()]
            if not held:
                continue
            try:
                renewal = await self._queue.extend(self.consumer, held)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1:  # once per outage
                    self._log.warning(
                        "cannot renew leases of running handlers",
                        error=f"{type(exc).__name__}: {exc}",
                    )
                continue
            for delivery in renewal.lost:
                key = (delivery.origin, delivery.id)
                if key in self._in_flight:
                    self._lost.add(key)
            for delivery in renewal.trimmed:
                key = (delivery.origin, delivery.id)
                if key in self._in_flight:
                    self._trimmed.add(key)
            if self._gate is not None:
                await self._renew_slots(self._gate)

    async def _renew_slots(self, gate: FlowGate) -> None:
        try:
            lost = await gate.renew()
        except Exception as exc:
            self._log.warning(
                "cannot renew concurrency slots", error=f"{type(exc).__name__}: {exc}"
            )
            return
        if lost:
            # Paused past the lease (a stopped process): the key may have run one more
            # handler than key_concurrency meanwhile. The handlers go on; say so.
            self._log.warning(
                "concurrency slots ran out while their handlers ran (the worker was paused "
                "longer than reclaim_idle); the key may have had one handler too many",
                slots=len(lost),
            )

    async def _leave_group(self) -> None:
        """Remove this consumer from the agent's group after a graceful stop, so that restarts
        do not pile up consumers. The bus keeps it if it still holds deliveries (handlers
        cancelled after the grace period, a final ack that failed): another worker takes those
        over and prunes it later. Failures are ignored: a consumer left listed is harmless."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_LEAVE_TIMEOUT):
            try:
                left = await self._queue.remove_consumer(self.consumer)
            except Exception as exc:
                self._log.debug("could not leave the consumer group", error=repr(exc))
                return
            if not left:
                self._log.debug("consumer kept in the group: it holds pending deliveries")

    async def _prune_consumers(self, reclaimed: list[Delivery]) -> None:
        """Remove the consumers of dead workers from the agent's group: those holding nothing
        pending and idle longer than `_prune_idle`. Called after each reclaim with what it took
        over; prunes at the first call (consumers left by earlier runs), then every
        `_PRUNE_INTERVAL` seconds, and, after a takeover, as soon as the consumer the delivery
        was taken from has been idle long enough. Failures are ignored until next time.

        The threshold is a multiple of `reclaim_idle`, the agent's own measure of how long a
        silent worker may still be alive, with a floor so that agents with a tiny one do not
        remove and re-add live consumers all the time. (Redis < 7.2 counts a consumer idle
        from its last delivery, so a live one that gets nothing looks idle too; removing it
        loses nothing, its next read adds it again.)
        """
        now = anyio.current_time()
        if reclaimed:
            # Its consumer stopped renewing, so nothing refreshes it: prunable by then.
            self._next_prune = min(self._next_prune, now + self._prune_idle)
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_INTERVAL
        try:
            removed = await self._queue.prune_consumers(self._prune_idle, alive=self._worker_alive)
        except Exception as exc:
            self._log.debug("could not prune the consumer group", error=repr(exc))
            return
        if removed:
            self._log.info("removed consumers of stopped workers from the group", consumers=removed)
