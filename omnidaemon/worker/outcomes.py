"""The outcome side of handling an event: retrying, deferring, cancelling or dead-lettering a
delivery, and reporting what happened (stored results, failure replies, webhooks, metrics,
logs), or nothing when the delivery turns out to be another worker's. `AgentConsumer`
inherits it."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import Envelope, UnsupportedVersion
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability import tracing
from omnidaemon.observability.logging import Logger
from omnidaemon.requests import FAILURE_HEADER, ReplyTarget, is_request_reply, reply_target
from omnidaemon.results import FINAL_STATUSES, Result, ResultStatus
from omnidaemon.streaming.writer import end_attempt
from omnidaemon.topology import type_name
from omnidaemon.traces.records import Outcome, TraceBook
from omnidaemon.worker.notify import OutcomeNotifier
from omnidaemon.worker.watchdog import LoopWatchdog

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.cancellation import Cancellation
    from omnidaemon.worker.acks import AckBatcher
    from omnidaemon.worker.lanes import AgentQueue

__all__ = ["Outcomes", "event_fields"]

_CLAIM_RECHECK = 0.5  # seconds before a delivery waiting on another run's claim is tried again


def event_fields(envelope: Envelope[Any] | None, delivery: Delivery) -> dict[str, Any]:
    """The log fields that name an event (or, unread, its entry) and its attempt."""
    if envelope is None:
        return {"entry_id": delivery.id, "attempt": delivery.attempt}
    return {
        "event_id": envelope.id,
        "attempt": delivery.attempt,
        "correlation_id": envelope.correlation_id,
    }


class Outcomes:
    """Settling failures and reporting outcomes, for one agent in one worker."""

    # Set by AgentConsumer.__init__.
    subscription: Subscription
    notifier: OutcomeNotifier | None
    watchdog: LoopWatchdog | None
    metrics: AgentMetrics
    _app: App
    _spec: AgentSpec
    _broker: Broker
    _queue: AgentQueue
    _trimmed: set[tuple[str, str]]
    _lost: set[tuple[str, str]]
    _acks: AckBatcher
    _trace: TraceBook
    _tracing: bool
    _max_payload_bytes: int
    running: dict[tuple[str, str], tuple[Delivery, float]]
    _log: Logger

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
        if not await self._queue.retry(delivery, delay, trimmed=trimmed):
            self._report_lost(delivery, envelope)
            return
        if failed:
            self.metrics.failed += 1
        self.metrics.retried += 1
        error = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
        self._trace_ended(delivery, envelope, "retrying", error=error)
        if self._spec.store_results:
            await self._record(delivery, envelope.id, "retrying", error=error)
        await end_attempt(self, delivery, envelope.id, "retrying", error=error)
        self._log.warning(
            "handler failed; will retry",
            **event_fields(envelope, delivery),
            error=f"{type(exc).__name__}: {exc}",
            retry_in=round(delay, 3),
            attempts_left=policy.max_attempts - delivery.attempt,
        )

    async def _defer(self, delivery: Delivery, envelope: Envelope[Any], key: str) -> None:
        """Put back a delivery whose idempotency key a live run holds, to be tried again
        shortly as the same attempt: waiting in a handler slot would stop the agent's other
        work for as long as that run takes."""
        trimmed = (delivery.origin, delivery.id) in self._trimmed
        deferred = await self._queue.retry(
            delivery, _CLAIM_RECHECK, attempt=delivery.attempt, trimmed=trimmed
        )
        if not deferred:
            self._report_lost(delivery, envelope)
            return
        self._log.info(
            "another run holds the event's idempotency key; trying again shortly",
            **event_fields(envelope, delivery),
            idempotency_key=key,
        )

    async def _cancelled(
        self,
        delivery: Delivery,
        envelope: Envelope[Any],
        cancellation: Cancellation,
        *,
        ran: bool,
    ) -> None:
        """Settle a cancelled event (`App.cancel`): acknowledged, never retried, its outcome
        `cancelled` recorded, replied to a waiting request, sent to its webhook and counted;
        `ran` says whether its handler had started (and was stopped)."""
        if self._lost and (delivery.origin, delivery.id) in self._lost:
            self._report_lost(delivery, envelope)  # another worker settles it
            return
        self.metrics.cancelled += 1
        self._acks.add(delivery, urgent=delivery.attempt > 1)
        reason = cancellation.reason
        error = {"type": "Cancelled", "message": reason}
        self._trace_ended(delivery, envelope, "cancelled", error=error, acked=True)
        await self._reply_failure(delivery, envelope, "Cancelled", reason)
        if self._spec.store_results:
            await self._record(delivery, envelope.id, "cancelled", error=error)
        await end_attempt(self, delivery, envelope.id, "cancelled", error=error)
        if self.notifier is not None:
            self.notifier.finished(envelope, agent=self._spec.name, status="cancelled", error=error)
        self._log.info(
            "handler stopped: event cancelled" if ran else "event cancelled before it started",
            **event_fields(envelope, delivery),
            reason=reason,
        )

    def _trace_ended(
        self,
        delivery: Delivery,
        envelope: Envelope[Any],
        outcome: Outcome,
        error: dict[str, str] | None = None,
        published: Sequence[tuple[str, str]] = (),
        *,
        acked: bool = False,
    ) -> None:
        """Record in the run's trace how an attempt ended (sent with the next acks): called
        once the delivery is settled, never for one this worker lost. `acked`: its ack was
        just queued, which sends the record too (no batch of its own is needed). (A success
        is recorded by `Running._run_event` itself: `TraceBook.succeeded`.)"""
        if self._tracing:
            key = (delivery.origin, delivery.id)
            running = self.running.get(key)
            self._trace.ended(
                key,
                envelope,
                delivery.attempt,
                outcome,
                running[1] if running is not None else None,
                error,
                published,
                tracing.current_ids() if tracing.handling_span() is not None else None,
            )
            if not acked:
                self._acks.traced()

    def _report_lost(self, delivery: Delivery, envelope: Envelope[Any] | None) -> None:
        """A settle or renewal found the delivery taken over by another worker: that worker
        reports its outcome, so this one records, replies, notifies and counts nothing."""
        fields = event_fields(envelope, delivery)
        # A stall of this worker's own event loop is the usual cause, and one the user can fix;
        # the watchdog saw it if it happened since the lease was last renewable.
        window = 2 * self._spec.reclaim_idle + (self.watchdog.threshold if self.watchdog else 0)
        stall = self.watchdog.recent_stall(window) if self.watchdog is not None else None
        if stall is not None:
            self._log.warning(
                f"another worker took this event over: this worker's event loop was blocked for "
                f"{stall:.1f} s (see the warning about it), longer than reclaim_idle, so it "
                "could not renew its lease; its outcome here is dropped",
                **fields,
                blocked_for=round(stall, 3),
            )
            return
        self._log.warning(
            "another worker took this event over (this worker stopped renewing its lease for "
            "longer than reclaim_idle: its event loop blocked, or it was paused, overloaded or "
            "cut off); its outcome here is dropped",
            **fields,
        )

    async def _send_reply(self, event_id: str, topic: str, data: bytes) -> None:
        """Send a reply to a request-reply topic, if the request still waits for it.

        The topic lives only while its request waits: a reply that comes later (another
        agent's, or one after the timeout) is dropped rather than recreating the topic, which
        nobody would then delete.
        """
        if not await self._broker.publish_if_exists(topic, data):
            self._log.debug(
                "reply dropped: the request no longer waits (answered, timed out or gone)",
                event_id=event_id,
                reply_to=topic,
            )

    async def _reply_failure(
        self,
        delivery: Delivery,
        envelope: Envelope[Any] | None,
        error_type: str,
        message: str,
    ) -> None:
        """Tell a waiting `App.request` that the agent gave up, instead of letting it time out.

        An entry that was not read as an envelope (too large, malformed, an invalid payload)
        still answers, from what `reply_target` finds in its bytes.
        """
        if envelope is None:
            target = reply_target(delivery.data, self._max_payload_bytes)
        elif is_request_reply(envelope.reply_to):
            assert envelope.reply_to is not None
            target = ReplyTarget(
                envelope.id, envelope.reply_to, envelope.correlation_id, envelope.tenant_id
            )
        else:
            target = None
        if target is None:
            return
        _, data = self._app._encode(
            target.reply_to,
            {"type": error_type, "message": message, "agent": self._spec.name},
            correlation_id=target.correlation_id,
            causation_id=target.event_id,
            reply_to=None,
            webhook=None,
            tenant_id=target.tenant_id,
            headers={FAILURE_HEADER: "1"},
        )
        await self._send_reply(target.event_id, target.reply_to, data)

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
            started_at=self._attempt_started(delivery),
            finished_at=datetime.now(UTC) if finished else None,
        )
        await self._broker.put_result(
            event_id, self._spec.name, record.encode(), self._spec.result_ttl
        )

    def _attempt_started(self, delivery: Delivery) -> datetime | None:
        """When this worker began handling the delivery (wall clock), if it is handling it."""
        running = self.running.get((delivery.origin, delivery.id))
        return datetime.fromtimestamp(running[1], UTC) if running is not None else None

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
            read: Envelope[Any] | None = None
            with contextlib.suppress(ValidationError):
                read = Envelope[Any].model_validate_json(delivery.data)
            await self._dead_letter(
                delivery,
                None,
                "PayloadValidationError",
                f"payload does not match {type_name(self._spec.payload_type)}: {exc}",
                event_id=read.id if read is not None else None,
                traced=read,
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
        traced: Envelope[Any] | None = None,
    ) -> None:
        """Dead-letter the delivery (`envelope`: the event as its agent reads it, `None` when
        it could not be read that way; `traced`: the event as any reader can, for its run's
        trace, when only its payload is wrong)."""
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
        if not await self._queue.dead_letter(delivery, record.encode(), trimmed=trimmed):
            self._report_lost(delivery, envelope)
            return
        if failed:
            self.metrics.failed += 1
        self.metrics.dead_lettered += 1
        error = {"type": error_type, "message": message}
        traced = envelope if envelope is not None else traced
        if traced is not None:
            outcome: Outcome = "rejected" if error_type == "Reject" else "dead_lettered"
            self._trace_ended(delivery, traced, outcome, error)
        await self._reply_failure(delivery, envelope, error_type, message)
        if self._spec.store_results and record.event_id is not None:
            await self._record(delivery, record.event_id, "dead_lettered", error=error)
        await end_attempt(self, delivery, record.event_id, "dead_lettered", error=error)
        if self.notifier is not None and envelope is not None:
            self.notifier.finished(
                envelope,
                agent=self._spec.name,
                status="dead_lettered",
                error=error,
            )
        fields = event_fields(envelope, delivery)
        fields["event_id"] = record.event_id
        self._log.error("event dead-lettered", **fields, error_type=error_type, error=message)
