"""The consume loop of one agent: fetch, validate, handle, then settle each delivery."""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from pydantic import TypeAdapter, ValidationError

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Delivery, Subscription
from omnidaemon.context import Context
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import WIRE_VERSION, Envelope, UnsupportedVersion
from omnidaemon.errors import PayloadTooLarge
from omnidaemon.idempotency import HELD, NOT_STORED, Idempotency
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability import tracing
from omnidaemon.requests import FAILURE_HEADER, is_request_reply
from omnidaemon.results import FINAL_STATUSES, Result, ResultStatus
from omnidaemon.retry import Reject, Retry
from omnidaemon.topology import type_name
from omnidaemon.worker.acks import AckBatcher
from omnidaemon.worker.handoff import HandOff
from omnidaemon.worker.notify import OutcomeNotifier

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["AgentConsumer"]

_log = structlog.get_logger("omnidaemon.worker")
_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])

_FETCH_TIMEOUT = 2.0  # seconds one fetch may block; bounds how stale the reclaim check gets
# While handlers run, one of them may schedule a retry due sooner than a long fetch would
# return: fetch in shorter slices then, so the retry is picked up on time.
_BUSY_FETCH_TIMEOUT = 0.2
_MAX_RECLAIM_INTERVAL = 5.0
_ORPHANS = 1_000  # at most this many of its own unknown deliveries a consumer takes back at once
_CLAIM_RECHECK = 0.5  # seconds before a delivery waiting on another run's claim is tried again
_INTERRUPT_EVERY = 0.05  # seconds between tries to end a blocking fetch on a graceful stop
# Consumers of dead workers are pruned from the group at most this often (and once after a
# takeover), when idle for max(_PRUNE_IDLE_RECLAIMS * reclaim_idle, _PRUNE_IDLE_FLOOR): see
# AgentConsumer._prune_consumers.
_PRUNE_INTERVAL = 60.0
_PRUNE_IDLE_RECLAIMS = 3
_PRUNE_IDLE_FLOOR = 10.0  # five fetch timeouts: a live consumer reads far more often
_LEAVE_TIMEOUT = 2.0  # seconds a stopping worker gives the bus to remove its consumer
# How often, at most, a thread that outlived its handler's timeout is checked for its end
# (its slot is freed then): quickly at first, as it may be about to return.
_THREAD_POLL_INTERVAL = 0.25


def _event_fields(envelope: Envelope[Any] | None, delivery: Delivery) -> dict[str, Any]:
    if envelope is None:
        return {"entry_id": delivery.id, "attempt": delivery.attempt}
    return {
        "event_id": envelope.id,
        "attempt": delivery.attempt,
        "correlation_id": envelope.correlation_id,
    }


class _ThreadCall:
    """One call of a sync handler with a `timeout`; it borrows the agent's thread slot.

    `run` runs in the thread; the handler and `_await_thread` read `finished` from the event
    loop (plain attributes are enough: the GIL orders the writes).
    """

    __slots__ = ("abandoned", "ctx", "finished", "func", "payload")

    def __init__(self, func: Callable[[Any, Context], Any], payload: Any, ctx: Context) -> None:
        self.func = func
        self.payload = payload
        self.ctx = ctx
        self.abandoned = False  # its attempt is over: timed out, failed or cancelled
        self.finished = False  # the thread returned, or will never run it

    def run(self) -> Any:
        try:
            if self.abandoned:  # timed out before a thread took it up: too late to start
                return None
            return self.func(self.payload, self.ctx)
        finally:
            self.finished = True


class AgentConsumer:
    """Runs one agent in one worker: its consume loop, lease renewal and acknowledgements.

    Invariants kept here (DESIGN.md section 4): a delivery is acknowledged only after its
    handler returned and its outputs were published; a failure is retried for this agent only,
    or dead-lettered with the reason; at most `concurrency` handlers run at once, and only as
    many entries are fetched as there is room for.
    """

    def __init__(self, app: App, spec: AgentSpec, consumer: str, *, concurrency: int) -> None:
        self._app = app
        self._spec = spec
        self._broker = app.broker
        self.subscription = Subscription(spec.topic, spec.name, spec.start)
        self.consumer = consumer
        self._capacity = concurrency
        self._in_flight: dict[tuple[str, str], Delivery] = {}
        self._wake = anyio.Event()
        self._wake_waiting = False
        self._stopping = False
        self._stop_requested = anyio.Event()
        self._fetching = False
        self.abandoned_handlers = False
        """True once a shutdown cancelled handlers that outlived the grace period."""
        self.notifier: OutcomeNotifier | None = None  # set by the worker before it runs
        self._started: dict[tuple[str, str], datetime] = {}  # attempt start, for results
        self._idempotency = (
            Idempotency(
                self._broker,
                spec.name,
                spec.idempotency_key,
                ttl=spec.idempotency_ttl,
                # A claim outlives the longest run it protects: the timeout, else 10 minutes.
                lease=spec.timeout or 600.0,
                holder=consumer,
            )
            if spec.idempotency_key is not None
            else None
        )
        # A taken-over delivery on its last attempt, while it runs alone (see _dispatch).
        self._alone: tuple[str, str] | None = None
        self._draining = False  # no fetching until idle: a last attempt waits to run alone
        self._recovering = False  # a fetch failed: its entries may be pending for us unseen
        # Deliveries whose lease renewal found them taken over by another worker, or trimmed
        # from the stream (this worker's copy is the only one left).
        self._lost: set[tuple[str, str]] = set()
        self._trimmed: set[tuple[str, str]] = set()
        self.metrics = AgentMetrics(spec.topic, spec.name)
        """This worker's counts for the agent; written to the bus with the acks."""
        self._acks = AckBatcher(self._broker, self.subscription, metrics=self.metrics)
        self._thread_limiter = None if spec.is_async else anyio.CapacityLimiter(concurrency)
        # With a `timeout`, a sync handler's slot is borrowed by its `_ThreadCall`, so that
        # it can be kept after the attempt timed out, until the thread returns. Its thread is
        # started under this limiter, which never blocks, not under a second slot.
        self._timed_threads = (
            anyio.CapacityLimiter(math.inf)
            if not spec.is_async and spec.timeout is not None
            else None
        )
        self._abandoned_threads = 0  # threads still running after their attempt timed out
        self._service: anyio.abc.TaskGroup | None = None  # run()'s long-lived tasks
        # An async handler without a timeout is awaited in place: no cancel scope, no thread,
        # no extra coroutine frames on the hot path.
        self._direct = spec.is_async and spec.timeout is None
        self._max_payload_bytes = app.settings.max_payload_bytes
        self._log = _log.bind(agent=spec.name, topic=spec.topic)
        self._prune_idle = max(_PRUNE_IDLE_RECLAIMS * spec.reclaim_idle, _PRUNE_IDLE_FLOOR)
        self._next_prune = 0.0  # the first reclaim prunes: consumers of earlier crashed runs

    @property
    def capacity(self) -> int:
        """How many handlers of the agent this worker runs at once."""
        return self._capacity

    async def subscribe(self) -> None:
        """Create the agent's consumer group if it does not exist yet."""
        await self._broker.subscribe(self.subscription)

    def stop(self) -> None:
        """Stop fetching; handlers in flight go on. Safe to call more than once.

        A fetch under way is not cancelled but interrupted on the bus: it returns what it was
        handed, which is handled within the grace period. Cancelling it could leave entries
        delivered to this worker and never seen, charged an attempt when taken over.
        """
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()

    async def run(self, grace: float) -> None:
        """Consume until `stop()`, then give in-flight handlers `grace` seconds and flush acks."""
        async with anyio.create_task_group() as service:
            self._service = service
            service.start_soon(self._acks.run)
            service.start_soon(self._renew_leases)
            service.start_soon(self._interrupt_fetch_on_stop)
            # A fixed set of long-lived handler tasks takes deliveries from a queue: starting
            # a task per event costs more than the rest of the framework's work on it.
            ready: HandOff[Delivery] = HandOff()
            async with anyio.create_task_group() as handlers:
                for _ in range(self._capacity):
                    handlers.start_soon(self._serve_handlers, ready)
                await self._dispatch(ready)
                await self._take_back_orphans(ready)
                with anyio.move_on_after(grace):
                    while self._in_flight:
                        await self._wait_wake()
                ready.close()  # the handler tasks end once the queue is empty
                if self._in_flight:
                    self._log.warning(
                        "shutdown grace period over: cancelling handlers; "
                        "their events will be delivered again",
                        handlers=len(self._in_flight),
                        grace=grace,
                    )
                    self.abandoned_handlers = True
                    handlers.cancel_scope.cancel()
            await self._acks.flush()
            service.cancel_scope.cancel()
        await self._leave_group()

    async def _leave_group(self) -> None:
        """Remove this consumer from the agent's group after a graceful stop, so that restarts
        do not pile up consumers. The bus keeps it if it still holds deliveries (handlers
        cancelled after the grace period, a final ack that failed): another worker takes those
        over and prunes it later. Failures are ignored: a consumer left listed is harmless."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_LEAVE_TIMEOUT):
            try:
                left = await self._broker.remove_consumer(self.subscription, self.consumer)
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
            removed = await self._broker.prune_consumers(self.subscription, self._prune_idle)
        except Exception as exc:
            self._log.debug("could not prune the consumer group", error=repr(exc))
            return
        if removed:
            self._log.info("removed consumers of stopped workers from the group", consumers=removed)

    async def _wait_wake(self) -> None:
        # Handlers set the event only while someone waits on it: setting it for every
        # finished event costs more than it is worth when nobody is waiting.
        self._wake_waiting = True
        try:
            await self._wake.wait()
        finally:
            self._wake_waiting = False
        self._wake = anyio.Event()

    # Fetching -----------------------------------------------------------------------------

    async def _serve_handlers(self, ready: HandOff[Delivery]) -> None:
        while (delivery := await ready.get()) is not None:
            await self._handle(delivery)

    async def _dispatch(self, ready: HandOff[Delivery]) -> None:
        spec = self._spec
        last = spec.policy.max_attempts
        reclaim_interval = min(spec.reclaim_idle / 2, _MAX_RECLAIM_INTERVAL)
        next_reclaim = 0.0
        failures = 0
        held_back_before = False
        while not self._stopping:
            # A thread that outlived its attempt's timeout still holds its slot.
            free = self._capacity - len(self._in_flight) - self._abandoned_threads
            if free <= 0 or self._alone is not None or (self._draining and self._in_flight):
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
                    # by the next look, this one stops fetching until it is idle.
                    busy = bool(self._in_flight)
                    hold_back = last if busy and last > 1 else None
                    reclaimed = await self._broker.reclaim(
                        self.subscription, self.consumer, spec.reclaim_idle, 1, hold_back=hold_back
                    )
                    await self._prune_consumers(reclaimed)
                    next_reclaim = now if reclaimed else now + reclaim_interval
                    self._draining = bool(reclaimed.held_back) and held_back_before
                    held_back_before = bool(reclaimed.held_back)
                    deliveries = list(reclaimed)
                    for delivery in deliveries:
                        self._log.warning(
                            "took over an event whose worker stopped renewing it",
                            entry_id=delivery.id,
                            attempt=delivery.attempt,
                        )
                        if delivery.attempt == last and last > 1:
                            # Its worker died while running it: if it kills this one too,
                            # nothing else may be charged an attempt for it.
                            self._alone = (delivery.origin, delivery.id)
                if not deliveries and not self._draining:
                    longest = _BUSY_FETCH_TIMEOUT if self._in_flight else _FETCH_TIMEOUT
                    timeout = max(0.0, min(longest, next_reclaim - now))
                    self._fetching = True
                    try:
                        deliveries = await self._broker.fetch(
                            self.subscription, self.consumer, free, timeout
                        )
                    finally:
                        self._fetching = False
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
                # Finished work is acknowledged before the last attempt runs, so that if it
                # kills this worker, nothing finished is delivered (and charged) again.
                await self._acks.flush()
            await ready.put_all(deliveries)

    async def _orphans(self) -> list[Delivery]:
        """Deliveries the bus handed this consumer that it never saw (a fetch whose reply was
        lost), as they were delivered: same attempt, nothing charged."""
        held = await self._broker.recover(self.subscription, self.consumer, _ORPHANS)
        known = self._acks.waiting()  # finished, their acks not sent yet
        orphans = [
            d
            for d in held
            if (d.origin, d.id) not in self._in_flight and (d.origin, d.id) not in known
        ]
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
                    await self._broker.interrupt(self.subscription, self.consumer)
                except Exception as exc:
                    self._log.debug("could not interrupt the fetch", error=str(exc))
            await anyio.sleep(_INTERRUPT_EVERY)

    async def _renew_leases(self) -> None:
        interval = self._spec.reclaim_idle / 3
        failures = 0
        while True:
            await anyio.sleep(interval)
            if not self._in_flight:
                continue
            try:
                renewal = await self._broker.extend(
                    self.subscription, self.consumer, list(self._in_flight.values())
                )
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

    # Handling -----------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        metrics = self.metrics
        metrics.received += 1
        metrics.in_flight += 1
        try:
            await self._process(delivery)
        except Exception as exc:
            # Settling failed (the bus went away): the delivery stays pending and is delivered
            # again after `reclaim_idle`, so nothing is lost.
            self._log.error(
                "could not settle event; it will be delivered again",
                entry_id=delivery.id,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            metrics.in_flight -= 1
            key = (delivery.origin, delivery.id)
            self._in_flight.pop(key, None)
            if self._started:
                self._started.pop(key, None)
            if self._lost or self._trimmed:
                self._lost.discard(key)
                self._trimmed.discard(key)
            if self._alone == key:
                self._alone = None
                self._wake.set()
            if self._wake_waiting:
                self._wake.set()

    async def _process(self, delivery: Delivery) -> None:
        spec = self._spec
        if len(delivery.data) > self._max_payload_bytes:
            # Refused unread: parsing and validating an arbitrarily large entry is the cost
            # the limit is there to bound. The record keeps the entry, for a replay once the
            # limit is raised.
            await self._dead_letter(
                delivery,
                None,
                "PayloadTooLarge",
                f"the entry is {len(delivery.data):,} bytes, over this worker's "
                f"max_payload_bytes ({self._max_payload_bytes:,}; OMNIDAEMON_MAX_PAYLOAD_BYTES); "
                "it was not read",
            )
            return
        if delivery.attempt > spec.policy.max_attempts:
            # Read as raw JSON only: the record, a waiting request and the webhook still learn
            # which event it was, even if its payload would not validate.
            exhausted: Envelope[Any] | None = None
            with contextlib.suppress(ValidationError):
                exhausted = _ANY_ENVELOPE.validate_json(delivery.data)
            await self._dead_letter(
                delivery,
                exhausted,
                "AttemptsExhausted",
                f"its worker stopped without finishing it on all {delivery.attempt - 1} "
                f"attempts (max_retries={spec.policy.max_retries}); a handler that crashes "
                "or hangs its worker is the usual cause",
            )
            return
        try:
            envelope = spec.envelope_adapter.validate_json(delivery.data)
        except ValidationError as exc:
            await self._reject_undecodable(delivery, exc)
            return
        if envelope.v != WIRE_VERSION:
            # Decided on the validated `v`, not by reading the entry again: pydantic accepts
            # `"2"` and `2.0` as 2 where a second parser sees no integer, and such an entry
            # used to be handled as if it were version 1.
            message = str(UnsupportedVersion.of(envelope.v))
            await self._dead_letter(delivery, None, "UnsupportedVersion", message)
            return
        if not tracing.recording():
            await self._process_event(delivery, envelope)
            return
        # The span covers the outputs too, so the next agent's span is a child of this one.
        with tracing.handle_span(
            topic=envelope.topic,
            agent=spec.name,
            event_id=envelope.id,
            attempt=delivery.attempt,
            headers=envelope.headers,
        ):
            await self._process_event(delivery, envelope)

    async def _process_event(self, delivery: Delivery, envelope: Envelope[Any]) -> None:
        spec = self._spec
        if spec.store_results:
            self._started[(delivery.origin, delivery.id)] = datetime.now(UTC)
            await self._record(delivery, envelope.id, "running")
        ctx = Context(
            self._app,
            envelope,
            agent=spec.name,
            attempt=delivery.attempt,
            max_attempts=spec.policy.max_attempts,
        )
        idempotency = self._idempotency
        idempotency_key: str | None = None
        claim: bytes | None = None  # this run's claim of the key, while it holds one
        output: Any = NOT_STORED
        if idempotency is not None:
            try:
                idempotency_key = idempotency.key(envelope.payload)
                output, claim = await idempotency.claim(idempotency_key, envelope.id)
            except Exception as exc:
                await self._fail(delivery, envelope, exc, None)
                return
            if output is HELD:
                await self._defer(delivery, envelope, idempotency_key)
                return
            if output is not NOT_STORED:
                self._log.info(
                    "duplicate of a handled event: used the stored result",
                    **_event_fields(envelope, delivery),
                    idempotency_key=idempotency_key,
                )
        if output is NOT_STORED:
            done, output = await self._run_handler(delivery, envelope, ctx)
            if not done:
                if idempotency is not None and idempotency_key is not None and claim:
                    await idempotency.release(idempotency_key, claim)
                return
        key = (delivery.origin, delivery.id)
        if key in self._lost:
            # Another worker took the delivery over and reports its outcome. The handler's
            # effects did happen, so a key it held records that: the other run uses it.
            if idempotency is not None and idempotency_key is not None and claim:
                await idempotency.succeeded(idempotency_key, envelope.id, output)
            self._report_lost(delivery, envelope)
            return
        # A request (App.request) always gets its reply, even an empty one.
        if output is not None or is_request_reply(envelope.reply_to):
            try:
                await self._publish_outputs(envelope, output, replied=ctx.replied)
            except Exception as exc:
                if idempotency is not None and idempotency_key is not None and claim:
                    await idempotency.release(idempotency_key, claim)
                if isinstance(exc, PayloadTooLarge):
                    # Like a return value that breaks its annotation: a retry would redo the
                    # (possibly expensive) work to produce the same oversized output.
                    await self._dead_letter(
                        delivery, envelope, "PayloadTooLarge", str(exc), exc, failed=True
                    )
                else:
                    await self._fail(delivery, envelope, exc, None)
                return
        # Written before the ack, like every other output.
        if idempotency is not None and idempotency_key is not None:
            await idempotency.succeeded(idempotency_key, envelope.id, output)
        if spec.store_results:
            await self._record(delivery, envelope.id, "succeeded", result=output)
        self.metrics.succeeded += 1
        self.metrics.observe_latency(time.time() - envelope.created_at.timestamp())
        # A redelivery's ack goes out at once: its worker may be one a poison message kills.
        self._acks.add(delivery, urgent=delivery.attempt > 1)
        if self.notifier is not None:
            self.notifier.finished(envelope, agent=spec.name, status="succeeded", result=output)

    async def _run_handler(
        self, delivery: Delivery, envelope: Envelope[Any], ctx: Context
    ) -> tuple[bool, Any]:
        """Run the handler and check its return value: `(True, output as JSON data)`, or
        `(False, None)` once a failure has been settled (retry or dead letter)."""
        spec = self._spec
        metrics = self.metrics
        started = time.perf_counter()
        try:
            if self._direct:
                result = await spec.invoke(envelope.payload, ctx)
            else:
                result = await self._call(envelope.payload, ctx)
        except Reject as exc:
            metrics.observe_duration(time.perf_counter() - started)
            await self._dead_letter(delivery, envelope, "Reject", exc.reason, exc, failed=True)
            return False, None
        except Retry as exc:
            metrics.observe_duration(time.perf_counter() - started)
            await self._fail(delivery, envelope, exc, exc.delay, failed=True)
            return False, None
        except Exception as exc:
            metrics.observe_duration(time.perf_counter() - started)
            await self._fail(delivery, envelope, exc, None, failed=True)
            return False, None
        metrics.observe_duration(time.perf_counter() - started)
        if spec.return_adapter is None:
            return True, result
        try:
            result = spec.return_adapter.validate_python(result)
            return True, spec.return_adapter.dump_python(result, mode="json")
        except ValidationError as exc:
            await self._dead_letter(
                delivery,
                envelope,
                "ReturnValidationError",
                f"{spec.handler.__qualname__} returned a value that does not match its "
                f"return annotation {spec.return_type!r}: {exc}",
                exc,
                failed=True,
            )
            return False, None

    async def _call(self, payload: Any, ctx: Context) -> Any:
        spec = self._spec
        if spec.timeout is None:
            return await self._invoke(payload, ctx)
        if not spec.is_async:
            return await self._call_thread(payload, ctx, spec.timeout)
        with anyio.fail_after(spec.timeout):
            return await spec.invoke(payload, ctx)

    async def _call_thread(self, payload: Any, ctx: Context, timeout: float) -> Any:
        """Run a sync handler in a thread; raise `TimeoutError` after `timeout` seconds.

        A thread cannot be stopped, so the timeout only stops waiting for it: the attempt
        fails at once, but the thread keeps its slot until it returns (`_await_thread`).
        Timed-out handlers so never make more than `concurrency` threads, and `_dispatch`
        fetches nothing for the slots they hold.
        """
        limiter = self._thread_limiter
        assert limiter is not None
        call = _ThreadCall(self._spec.invoke, payload, ctx)
        try:
            limiter.acquire_on_behalf_of_nowait(call)
        except anyio.WouldBlock:
            # Not expected: `_dispatch` fetches only for the slots that neither handlers nor
            # timed-out threads hold. Should it happen, the attempt, and its timeout, start
            # once a slot is free: an event is not failed for time it did not run.
            await limiter.acquire_on_behalf_of(call)
        try:
            with anyio.fail_after(timeout):
                # Awaited here, not in a task of its own, so that a handler that returns in
                # time costs what it did before: the slot is only handed on when it did not.
                result = await anyio.to_thread.run_sync(
                    call.run, limiter=self._timed_threads, abandon_on_cancel=True
                )
        except BaseException:
            # The timeout, an exception from the handler, or a hard stop.
            call.abandoned = True  # a thread not started yet will not run it
            if call.finished:
                limiter.release_on_behalf_of(call)
            else:
                assert self._service is not None
                self._abandoned_threads += 1
                self._service.start_soon(self._await_thread, call)
            raise
        limiter.release_on_behalf_of(call)
        return result

    async def _await_thread(self, call: _ThreadCall) -> None:
        """Keep a timed-out handler's slot until its thread returns, then give it back.

        Runs in the service task group, which run() cancels at its end: stopping the worker
        never waits for such a thread. Polled, because the thread cannot wake the event loop
        itself: `anyio.from_thread.run_sync` blocks it until the loop runs the call, which
        never happens once the loop has stopped, and a stuck thread keeps the process alive.
        """
        delay = 0.01
        while not call.finished:
            await anyio.sleep(delay)
            delay = min(2 * delay, _THREAD_POLL_INTERVAL)
        assert self._thread_limiter is not None
        self._thread_limiter.release_on_behalf_of(call)
        self._abandoned_threads -= 1
        if self._wake_waiting:
            self._wake.set()  # a slot is free again

    async def _invoke(self, payload: Any, ctx: Context) -> Any:
        spec = self._spec
        if spec.is_async:
            return await spec.invoke(payload, ctx)
        return await anyio.to_thread.run_sync(
            spec.invoke, payload, ctx, limiter=self._thread_limiter, abandon_on_cancel=True
        )

    async def _publish_outputs(
        self, envelope: Envelope[Any], output: Any, *, replied: bool
    ) -> None:
        reply_to = None if replied else envelope.reply_to
        publishes = self._spec.publishes if output is not None else None
        targets = [t for t in (publishes, reply_to) if t is not None]
        if not targets:
            return
        entries = []
        for topic in targets:
            _, data = self._app._encode(
                topic,
                output,
                correlation_id=envelope.correlation_id,
                causation_id=envelope.id,
                reply_to=None,
                webhook=None,
                tenant_id=envelope.tenant_id,
                headers=None,
            )
            entries.append((topic, data))
        if reply_to is not None and is_request_reply(reply_to):
            # The reply (last of the targets) only goes to a request that still waits for it.
            *entries, (_, reply) = entries
            if entries:
                await self._broker.publish_many(entries)
            await self._send_reply(envelope, reply_to, reply)
            return
        await self._broker.publish_many(entries)

    async def _send_reply(self, envelope: Envelope[Any], topic: str, data: bytes) -> None:
        """Send a reply to a request-reply topic, if the request still waits for it.

        The topic lives only while its request waits: a reply that comes later (another
        agent's, or one after the timeout) is dropped rather than recreating the topic, which
        nobody would then delete.
        """
        if not await self._broker.publish_if_exists(topic, data):
            self._log.debug(
                "reply dropped: the request no longer waits (answered, timed out or gone)",
                event_id=envelope.id,
                reply_to=topic,
            )

    # Settling failures --------------------------------------------------------------------

    async def _fail(
        self,
        delivery: Delivery,
        envelope: Envelope[Any],
        exc: Exception,
        delay: float | None,
        *,
        failed: bool = False,
    ) -> None:
        """Retry the delivery, or dead-letter it after its last attempt; `failed` counts a
        handler failure once the delivery is settled."""
        policy = self._spec.policy
        if delivery.attempt >= policy.max_attempts:
            await self._dead_letter(
                delivery,
                envelope,
                type(exc).__name__,
                str(exc) or repr(exc),
                exc,
                failed=failed,
            )
            return
        tracing.record_failure(exc)
        if delay is None:
            delay = policy.backoff.delay(delivery.attempt)
        trimmed = (delivery.origin, delivery.id) in self._trimmed
        if not await self._broker.retry(self.subscription, delivery, delay, trimmed=trimmed):
            self._report_lost(delivery, envelope)
            return
        if failed:
            self.metrics.failed += 1
        self.metrics.retried += 1
        if self._spec.store_results:
            error = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
            await self._record(delivery, envelope.id, "retrying", error=error)
        self._log.warning(
            "handler failed; will retry",
            **_event_fields(envelope, delivery),
            error=f"{type(exc).__name__}: {exc}",
            retry_in=round(delay, 3),
            attempts_left=policy.max_attempts - delivery.attempt,
        )

    async def _defer(self, delivery: Delivery, envelope: Envelope[Any], key: str) -> None:
        """Put back a delivery whose idempotency key a live run holds, to be tried again
        shortly as the same attempt: waiting in a handler slot would stop the agent's other
        work for as long as that run takes."""
        trimmed = (delivery.origin, delivery.id) in self._trimmed
        deferred = await self._broker.retry(
            self.subscription, delivery, _CLAIM_RECHECK, attempt=delivery.attempt, trimmed=trimmed
        )
        if not deferred:
            self._report_lost(delivery, envelope)
            return
        self._log.info(
            "another run holds the event's idempotency key; trying again shortly",
            **_event_fields(envelope, delivery),
            idempotency_key=key,
        )

    def _report_lost(self, delivery: Delivery, envelope: Envelope[Any] | None) -> None:
        """A settle or renewal found the delivery taken over by another worker: that worker
        reports its outcome, so this one records, replies, notifies and counts nothing."""
        self._log.warning(
            "another worker took this event over (this worker stopped renewing its lease for "
            "longer than reclaim_idle: paused, overloaded or cut off); its outcome here is "
            "dropped",
            **_event_fields(envelope, delivery),
        )

    async def _reply_failure(self, envelope: Envelope[Any], error_type: str, message: str) -> None:
        """Tell a waiting `App.request` that the agent gave up, instead of letting it time out."""
        assert envelope.reply_to is not None
        _, data = self._app._encode(
            envelope.reply_to,
            {"type": error_type, "message": message, "agent": self._spec.name},
            correlation_id=envelope.correlation_id,
            causation_id=envelope.id,
            reply_to=None,
            webhook=None,
            tenant_id=envelope.tenant_id,
            headers={FAILURE_HEADER: "1"},
        )
        await self._send_reply(envelope, envelope.reply_to, data)

    async def _record(
        self,
        delivery: Delivery,
        event_id: str,
        status: ResultStatus,
        *,
        result: Any = None,
        error: dict[str, str] | None = None,
    ) -> None:
        """Store the event's status for `App.result` (agents with `store_results=True`)."""
        finished = status in FINAL_STATUSES
        record = Result(
            event_id=event_id,
            agent=self._spec.name,
            status=status,
            result=result,
            error=error,
            attempts=delivery.attempt,
            started_at=self._started.get((delivery.origin, delivery.id)),
            finished_at=datetime.now(UTC) if finished else None,
        )
        await self._broker.put_result(
            event_id, self._spec.name, record.encode(), self._spec.result_ttl
        )

    async def _reject_undecodable(self, delivery: Delivery, exc: ValidationError) -> None:
        errors = exc.errors(include_url=False)
        # An entry without a `payload` field at all is no readable envelope; only errors
        # inside a payload that is there mean it does not match the agent's type.
        payload_only = bool(errors) and all(
            e["loc"][:1] == ("payload",) and (len(e["loc"]) > 1 or e["type"] != "missing")
            for e in errors
        )
        try:
            Envelope.check_version(delivery.data)
        except UnsupportedVersion as version_error:
            await self._dead_letter(delivery, None, "UnsupportedVersion", str(version_error))
            return
        if payload_only:
            event_id: str | None = None
            with contextlib.suppress(ValidationError):
                event_id = Envelope[Any].model_validate_json(delivery.data).id
            await self._dead_letter(
                delivery,
                None,
                "PayloadValidationError",
                f"payload does not match {type_name(self._spec.payload_type)}: {exc}",
                event_id=event_id,
            )
        else:
            await self._dead_letter(
                delivery, None, "MalformedEnvelope", f"not a readable omnidaemon envelope: {exc}"
            )

    async def _dead_letter(
        self,
        delivery: Delivery,
        envelope: Envelope[Any] | None,
        error_type: str,
        message: str,
        exc: BaseException | None = None,
        *,
        event_id: str | None = None,
        failed: bool = False,
    ) -> None:
        if exc is not None:
            tracing.record_failure(exc, f"{error_type}: {message}")
        record = DeadLetter(
            event_id=envelope.id if envelope is not None else event_id,
            topic=self._spec.topic,
            agent=self._spec.name,
            entry=delivery.data.decode("utf-8", "backslashreplace"),
            error_type=error_type,
            error_message=message,
            traceback="".join(traceback.format_exception(exc)) if exc is not None else None,
            attempts=delivery.attempt,
            failed_at=datetime.now(UTC),
        )
        trimmed = (delivery.origin, delivery.id) in self._trimmed
        if not await self._broker.dead_letter(
            self.subscription, delivery, record.encode(), trimmed=trimmed
        ):
            self._report_lost(delivery, envelope)
            return
        if failed:
            self.metrics.failed += 1
        self.metrics.dead_lettered += 1
        if envelope is not None and is_request_reply(envelope.reply_to):
            await self._reply_failure(envelope, error_type, message)
        if self._spec.store_results and record.event_id is not None:
            error = {"type": error_type, "message": message}
            await self._record(delivery, record.event_id, "dead_lettered", error=error)
        if self.notifier is not None and envelope is not None:
            self.notifier.finished(
                envelope,
                agent=self._spec.name,
                status="dead_lettered",
                error={"type": error_type, "message": message},
            )
        fields = _event_fields(envelope, delivery)
        fields["event_id"] = record.event_id
        self._log.error("event dead-lettered", **fields, error_type=error_type, error=message)
