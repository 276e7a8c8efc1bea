"""The consume loop of one agent: fetch, validate, handle, then settle each delivery.

The fetching side (fetch, reclaim, leases, group membership) is `worker/fetching.py`; flow
control before a handler starts is `worker/admission.py`; running an admitted event (its
handler, cancellation, outputs and success) is `worker/running.py`; settling failures and
reporting outcomes is `worker/outcomes.py`; sync handlers with a timeout run through
`worker/threads.py`.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import TypeAdapter, ValidationError

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Delivery, Subscription
from omnidaemon.debounce.spec import is_check_topic
from omnidaemon.envelope import WIRE_VERSION, Envelope, UnsupportedVersion
from omnidaemon.flow.gate import FlowGate
from omnidaemon.flow.limits import FlowSpec
from omnidaemon.idempotency import Idempotency
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability import tracing
from omnidaemon.observability.logging import get_logger
from omnidaemon.traces.records import TraceBook
from omnidaemon.worker.acks import AckBatcher
from omnidaemon.worker.admission import Admitting
from omnidaemon.worker.cancels import CancelWatch
from omnidaemon.worker.fetching import Fetching, prune_idle
from omnidaemon.worker.handoff import HandOff
from omnidaemon.worker.isolation import Isolation
from omnidaemon.worker.lanes import AgentQueue
from omnidaemon.worker.notify import OutcomeNotifier
from omnidaemon.worker.running import Running
from omnidaemon.worker.threads import TimedThreads
from omnidaemon.worker.watchdog import LoopWatchdog

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["AgentConsumer"]

_log = get_logger("omnidaemon.worker")
_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])


class AgentConsumer(Admitting, Fetching, Running):
    """Runs one agent in one worker: its consume loop, lease renewal and acknowledgements.

    Invariants kept here (DESIGN.md section 4): a delivery is acknowledged only after its
    handler returned and its outputs were published; a failure is retried for this agent only,
    or dead-lettered with the reason; at most `concurrency` handlers run at once, and only as
    many entries are fetched as there is room for.
    """

    def __init__(
        self,
        app: App,
        spec: AgentSpec,
        consumer: str,
        *,
        concurrency: int,
        isolation: Isolation | None = None,
        cancels: CancelWatch | None = None,
    ) -> None:
        self._app = app
        self._spec = spec
        self._broker = app.broker
        self.subscription = Subscription(spec.topic, spec.name, spec.start)
        self._queue = AgentQueue(self._broker, self.subscription)
        self.consumer = consumer
        self._capacity = concurrency
        self._in_flight: dict[tuple[str, str], Delivery] = {}
        self.running: dict[tuple[str, str], tuple[Delivery, float]] = {}
        """The deliveries whose handling has begun, with the wall-clock time it began: what
        the heartbeat lists for `omnidaemon inspect`."""
        self._wake = anyio.Event()
        self._wake_waiting = False
        self._stopping = False
        self._stop_requested = anyio.Event()
        self._fetching = False
        self.abandoned_handlers = False
        """True once a shutdown cancelled handlers that outlived the grace period."""
        self.notifier: OutcomeNotifier | None = None  # set by the worker before it runs
        self.watchdog: LoopWatchdog | None = None  # the worker's, for lines about lost leases
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
        settings = app.settings
        self._trace = TraceBook(
            spec.name, consumer, settings.trace_ttl, settings.trace_max_records, self.running
        )
        """This worker's records of the agent's attempts for the runs' traces, written to
        the bus with the acks."""
        self._tracing = self._trace.enabled
        self._acks = AckBatcher(self._queue, metrics=self.metrics, trace=self._trace)
        # Shared by the worker's consumers: a last attempt runs with nothing else in the worker.
        self._isolation = isolation if isolation is not None else Isolation()
        self._isolation.join(self._in_flight, self._nudge, self._acks.flush)
        # Shared by the worker's consumers: the cancellations it follows (see App.cancel). A
        # debounced agent's window timers get a watch of their own that never learns any:
        # they are not cancelled (their messages are, when they are collected).
        self._cancels = (
            cancels
            if cancels is not None and not is_check_topic(spec.topic)
            else CancelWatch(self._broker)
        )
        self.timeouts: set[anyio.CancelScope] = set()
        """The cancel scopes of handlers running under the agent's `timeout`, so that
        `omnidaemon.testing` can move their deadlines when a test fast-forwards time."""
        self._thread_limiter = None if spec.is_async else anyio.CapacityLimiter(concurrency)
        self._threads = (
            TimedThreads(spec.invoke, self._thread_limiter, self._nudge, self.timeouts)
            if self._thread_limiter is not None and spec.timeout is not None
            else None
        )
        # An async handler without a timeout is awaited in place: no cancel scope, no thread,
        # no extra coroutine frames on the hot path.
        self._direct = spec.is_async and spec.timeout is None
        self._max_payload_bytes = app.settings.max_payload_bytes
        self._log = _log.bind(agent=spec.name, topic=spec.topic)
        budgets = app.budgets
        self._gate = (
            FlowGate(
                self._broker,
                spec.name,
                spec.flow or FlowSpec(),
                lease=spec.reclaim_idle,
                consumer=consumer,
                budgets=budgets,
                log=self._log,
            )
            if spec.flow is not None or budgets
            else None
        )
        self._prune_idle = prune_idle(spec)
        self._next_prune = 0.0  # the first reclaim prunes: consumers of earlier crashed runs
        self._due: list[float] = []  # when events this consumer put back are due (a heap)
        self._paid: set[tuple[str, str]] = set()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The subscriptions the agent reads: its topic's, and its priority lanes' once used."""
        return self._queue.subscriptions

    @property
    def traces_unsent(self) -> bool:
        """Whether trace records of the agent wait for their write (with the next acks)."""
        return self._acks.traces_unsent

    @property
    def capacity(self) -> int:
        """How many handlers of the agent this worker runs at once."""
        return self._capacity

    async def subscribe(self) -> None:
        """Create the agent's consumer group if it does not exist yet."""
        await self._queue.subscribe()

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
            if self._threads is not None:
                self._threads.service = service
            service.start_soon(self._acks.run)
            service.start_soon(self._renew_leases)
            service.start_soon(self._interrupt_fetch_on_stop)
            # A fixed set of long-lived handler tasks takes deliveries from a queue: starting
            # a task per event costs more than the rest of the framework's work on it.
            ready: HandOff[Delivery] = HandOff()
            async with anyio.create_task_group() as handlers:
                for _ in range(self._capacity):
                    handlers.start_soon(self._serve_handlers, ready)
                try:
                    await self._dispatch(ready)
                finally:
                    self._set_draining(False)  # other agents of the worker must not wait on it
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

    def _nudge(self) -> None:
        # Something the fetch loop may be waiting for changed: a timed-out handler's thread
        # returned (a slot is free again), or the worker-wide isolation moved on.
        if self._wake_waiting:
            self._wake.set()

    # Handling -----------------------------------------------------------------------------

    async def _serve_handlers(self, ready: HandOff[Delivery]) -> None:
        while (delivery := await ready.get()) is not None:
            await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        metrics = self.metrics
        metrics.received += 1
        metrics.in_flight += 1
        key = (delivery.origin, delivery.id)
        self.running[key] = (delivery, time.time())
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
            self.running.pop(key, None)
            self._in_flight.pop(key, None)
            if self._paid:
                self._paid.discard(key)
            if self._lost or self._trimmed:
                self._lost.discard(key)
                self._trimmed.discard(key)
            isolation = self._isolation
            if isolation.running_alone or isolation.draining:
                # The worker may now be idle (a consumer waits for that), or a last attempt
                # that ran alone is over (every consumer of the worker waits for that).
                if self._alone == key:
                    self._alone = None
                    isolation.running_alone -= 1
                isolation.wake_all()
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
            trust_parent=self._app.settings.trust_trace_context,
            run_id=envelope.correlation_id,
        ):
            await self._process_event(delivery, envelope)
