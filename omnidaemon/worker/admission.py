"""Before a handler starts: cancellation, expiry, admission by the agent's limits, and putting
a refused event back on the bus to wait. `AgentConsumer` inherits it; the limits themselves
are `omnidaemon.flow`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.envelope import Envelope
from omnidaemon.flow.gate import Admission, FlowGate, Refusal, mark_waited
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability.logging import Logger

if TYPE_CHECKING:
    from omnidaemon.cancellation import Cancellation
    from omnidaemon.worker.cancels import CancelWatch
    from omnidaemon.worker.lanes import AgentQueue

__all__ = ["Admitting"]

_DUE_MARGIN = 0.003  # seconds added to the wait of an event put back by flow control


class Admitting:
    """What happens between a delivery's validation and its handler: flow control."""

    # Set by AgentConsumer.__init__, or defined by its other bases.
    subscription: Subscription
    metrics: AgentMetrics
    _spec: AgentSpec
    _broker: Broker
    _queue: AgentQueue
    _gate: FlowGate | None
    _cancels: CancelWatch
    _paid: set[tuple[str, str]]
    _trimmed: set[tuple[str, str]]
    _log: Logger

    if TYPE_CHECKING:  # defined by AgentConsumer and its other bases

        async def _run_event(
            self, delivery: Delivery, envelope: Envelope[Any], admission: Admission | None
        ) -> None: ...

        async def _fail(
            self,
            delivery: Delivery,
            envelope: Envelope[Any],
            exc: Exception,
            delay: float | None,
            *,
            failed: bool = False,
        ) -> None: ...

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
            traced: Envelope[Any] | None = None,
        ) -> None: ...

        def _report_lost(self, delivery: Delivery, envelope: Envelope[Any] | None) -> None: ...

        async def _cancelled(
            self,
            delivery: Delivery,
            envelope: Envelope[Any],
            cancellation: Cancellation,
            *,
            ran: bool,
        ) -> None: ...

        def _due_at(self, wait: float) -> None: ...

    async def _process_event(self, delivery: Delivery, envelope: Envelope[Any]) -> None:
        if not self._cancels.registry.empty:
            found = self._cancels.check(envelope, self._spec.name)
            if found is not None:
                await self._cancelled(delivery, envelope, found, ran=False)
                return
        gate = self._gate
        paid = bool(self._paid) and (delivery.origin, delivery.id) in self._paid
        if envelope.expires_at is not None and await self._expired(delivery, envelope, 0.0):
            # A start taken for it at the fetch is spent: given back now, it could be used
            # later than the limit counted it.
            return
        if gate is None or self._spec.flow is None:
            await self._run_event(delivery, envelope, None)
            return
        if paid and gate.only_rate_limit:
            await self._run_event(delivery, envelope, None)  # its start was taken at fetch
            return
        try:
            verdict = await gate.admit(envelope, paid=paid)
        except Exception as exc:
            # A key or estimate function that raised: the attempt fails like a handler's.
            await self._fail(delivery, envelope, exc, None)
            return
        if isinstance(verdict, Refusal):
            await self._wait_on_bus(delivery, envelope, verdict)
            return
        if verdict.waited:
            self.metrics.observe_wait(verdict.waited)
        try:
            await self._run_event(delivery, envelope, verdict)
        finally:
            await self._release(verdict)

    async def _expired(self, delivery: Delivery, envelope: Envelope[Any], wait: float) -> bool:
        """Dead-letter the event as `Expired`, unrun, if it expires within `wait` seconds
        (0: it has expired); say whether it did."""
        assert envelope.expires_at is not None
        now = self._broker.clock()
        expires = envelope.expires_at.timestamp()
        if expires > now + wait:
            return False
        why = (
            "it expired before it started"
            if expires <= now
            else f"it would expire before flow control lets it start (in {wait:.3g} s)"
        )
        self.metrics.expired += 1
        await self._dead_letter(
            delivery,
            envelope,
            "Expired",
            f"{why}: expires_at {envelope.expires_at.isoformat()}; it was not run",
        )
        return True

    async def _wait_on_bus(
        self, delivery: Delivery, envelope: Envelope[Any], refusal: Refusal
    ) -> None:
        """Put an event a limit refused back on the bus until the limit allows it: the same
        attempt, no lease held, no handler slot taken (see `omnidaemon.flow.gate`)."""
        if envelope.expires_at is not None and await self._expired(
            delivery, envelope, refusal.wait
        ):
            return
        key = (delivery.origin, delivery.id)
        waiting = replace(delivery, data=mark_waited(delivery.data, refusal.since))
        deferred = await self._queue.retry(
            waiting,
            # A bus rounds delays down to its resolution (milliseconds): a hair early, the
            # event would find its turn not come yet and be put back once more.
            refusal.wait + _DUE_MARGIN,
            attempt=delivery.attempt,
            trimmed=key in self._trimmed,
        )
        if not deferred:
            self._report_lost(delivery, envelope)
            return
        self.metrics.throttled += 1
        self._due_at(refusal.wait + _DUE_MARGIN)

    async def _release(self, admission: Admission) -> None:
        assert self._gate is not None
        try:
            await self._gate.release(admission)
        except Exception as exc:
            # The slot's lease runs out by itself after reclaim_idle.
            self._log.warning(
                "could not free a concurrency slot; it frees itself when its lease runs out",
                error=f"{type(exc).__name__}: {exc}",
            )
