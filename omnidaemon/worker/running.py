"""Running one admitted event: its idempotency claim, its handler (which a cancellation may
stop), the handler's outputs, and its success. `AgentConsumer` inherits it; failures and
outcomes are settled by `Outcomes`."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC
from functools import partial
from typing import Any

import anyio
from pydantic import ValidationError

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers.base import Broker, Delivery
from omnidaemon.context import Context
from omnidaemon.envelope import Envelope, dumps
from omnidaemon.errors import PayloadTooLarge, PayloadValidationError
from omnidaemon.flow.gate import Admission, FlowGate
from omnidaemon.idempotency import HELD, NOT_STORED, Idempotency
from omnidaemon.lanes import Lane
from omnidaemon.observability import tracing
from omnidaemon.requests import is_request_reply
from omnidaemon.retry import Reject, Retry
from omnidaemon.streaming.writer import end_attempt
from omnidaemon.worker.acks import AckBatcher
from omnidaemon.worker.cancels import CancelWatch, Handling
from omnidaemon.worker.lanes import lane_of_delivery
from omnidaemon.worker.outcomes import Outcomes, event_fields
from omnidaemon.worker.threads import TimedThreads

__all__ = ["Running"]


class Running(Outcomes):
    """Runs admitted events, for one agent in one worker."""

    # Set by AgentConsumer.__init__.
    _spec: AgentSpec
    _broker: Broker
    _gate: FlowGate | None
    _idempotency: Idempotency | None
    _cancels: CancelWatch
    _acks: AckBatcher
    _direct: bool
    _threads: TimedThreads | None
    _thread_limiter: anyio.CapacityLimiter | None
    timeouts: set[anyio.CancelScope]

    async def _run_event(
        self, delivery: Delivery, envelope: Envelope[Any], admission: Admission | None
    ) -> None:
        spec = self._spec
        if spec.store_results:
            await self._record(delivery, envelope.id, "running")
        ctx = Context(
            self._app,
            envelope,
            agent=spec.name,
            attempt=delivery.attempt,
            max_attempts=spec.policy.max_attempts,
            priority=lane_of_delivery(delivery),
        )
        if self._gate is not None:
            ctx._charge = partial(self._gate.charge, admission)
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
                    **event_fields(envelope, delivery),
                    idempotency_key=idempotency_key,
                )
        if output is NOT_STORED:
            done, output = await self._run_handler(delivery, envelope, ctx)
            if not done:
                if idempotency is not None and idempotency_key is not None and claim:
                    await idempotency.release(idempotency_key, claim)
                return
        if self._lost and (delivery.origin, delivery.id) in self._lost:
            # Another worker took the delivery over and reports its outcome. The handler's
            # effects did happen, so a key it held records that: the other run uses it.
            if idempotency is not None and idempotency_key is not None and claim:
                await idempotency.succeeded(idempotency_key, envelope.id, output)
            self._report_lost(delivery, envelope)
            return
        published = ctx._published or []
        # A request (App.request) always gets its reply, even an empty one.
        if output is not None or is_request_reply(envelope.reply_to):
            try:
                published += await self._publish_outputs(
                    envelope, output, replied=ctx.replied, lane=ctx.priority
                )
            except Exception as exc:
                if idempotency is not None and idempotency_key is not None and claim:
                    await idempotency.release(idempotency_key, claim)
                if isinstance(exc, PayloadTooLarge | PayloadValidationError):
                    # Like a return value that breaks its annotation: a retry would redo the
                    # (possibly expensive) work to produce the same output: too large, one
                    # JSON cannot carry, or one of the wrong type for the topic it goes to.
                    await self._dead_letter(
                        delivery, envelope, type(exc).__name__, str(exc), exc, failed=True
                    )
                else:
                    await self._fail(delivery, envelope, exc, None)
                return
        # Written before the ack, like every other output.
        if idempotency is not None and idempotency_key is not None:
            await idempotency.succeeded(idempotency_key, envelope.id, output)
        if spec.store_results:
            await self._record(delivery, envelope.id, "succeeded", result=output)
        if ctx._stream is not None or spec.stream_type is not None or delivery.attempt > 1:
            # Ends the stream this attempt (or an earlier one) began; skipped when none could.
            await end_attempt(self, delivery, envelope.id, "succeeded", result=output)
        self.metrics.succeeded += 1
        now = time.time()
        created_at = envelope.created_at
        if created_at.tzinfo is None:  # a publisher's time with no zone: taken as UTC
            created_at = created_at.replace(tzinfo=UTC)
        created = created_at.timestamp()
        self.metrics.observe_latency(now - created)
        # A redelivery's ack goes out at once: its worker may be one a poison message kills.
        self._acks.add(delivery, urgent=delivery.attempt > 1)
        if self._tracing:
            # `_trace_ended`, written out for the path every event that succeeds takes (the
            # queued ack carries the record). Its delivery leaves the running ones now: nothing
            # reads its entry any more, and no start record may follow this end.
            key = (delivery.origin, delivery.id)
            under_way = self.running.pop(key, None)
            self._trace.succeeded(
                key,
                envelope,
                delivery.attempt,
                under_way[1] if under_way is not None else now,
                now,
                created,
                published,
                tracing.current_ids() if tracing.handling_span() is not None else None,
            )
        if self.notifier is not None:
            self.notifier.finished(envelope, agent=spec.name, status="succeeded", result=output)

    async def _run_handler(
        self, delivery: Delivery, envelope: Envelope[Any], ctx: Context
    ) -> tuple[bool, Any]:
        """Run the handler and check its return value: `(True, output as JSON data)`, or
        `(False, None)` once a failure has been settled (retry or dead letter)."""
        spec = self._spec
        metrics = self.metrics
        cancels = self._cancels
        handling = Handling(envelope, spec.name, ctx)
        cancels.started(handling)  # a cancellation learnt since the check applies from here
        started = time.perf_counter()
        error: Exception | None = None
        ran = handling.cancellation is None  # else cancelled while it was being admitted
        try:
            if not ran:
                pass
            elif spec.is_async:
                # A cancellation interrupts this task (see Handling.cancel): cheaper than a
                # cancel scope per event, which costs more than the rest of the hot path.
                handling.task = asyncio.current_task()
                try:
                    if self._direct:
                        result = await spec.invoke(envelope.payload, ctx)
                    else:
                        result = await self._call(envelope.payload, ctx)
                except asyncio.CancelledError:
                    if not handling.interrupted:
                        raise  # not ours: the worker is shutting down
            else:
                result = await self._call(envelope.payload, ctx)
        except Exception as exc:
            error = exc
        finally:
            # From here a cancellation no longer applies: the outcome is what the handler did
            # (exactly one outcome, whichever came first).
            cancels.ended(handling)
        if handling.cancellation is not None:
            if ran:
                metrics.observe_duration(time.perf_counter() - started)
            await self._cancelled(delivery, envelope, handling.cancellation, ran=ran)
            return False, None
        metrics.observe_duration(time.perf_counter() - started)
        if error is not None:
            if isinstance(error, Reject):
                await self._dead_letter(
                    delivery, envelope, "Reject", error.reason, error, failed=True
                )
            else:
                delay = error.delay if isinstance(error, Retry) else None
                await self._fail(delivery, envelope, error, delay, failed=True)
            return False, None
        if spec.return_adapter is None:
            if result is not None:
                try:
                    # Unchecked by an annotation: make sure it can be stored, published and
                    # sent, here where it is produced, rather than fail later in a settle.
                    dumps(result)
                except TypeError as exc:
                    await self._dead_letter(
                        delivery,
                        envelope,
                        "ResultNotJSON",
                        f"{spec.handler.__qualname__} returned a value JSON cannot carry: {exc}",
                        exc,
                        failed=True,
                    )
                    return False, None
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
            assert self._threads is not None
            return await self._threads.call(payload, ctx, spec.timeout)
        with anyio.fail_after(spec.timeout) as scope:
            self.timeouts.add(scope)
            try:
                return await spec.invoke(payload, ctx)
            finally:
                self.timeouts.discard(scope)

    async def _invoke(self, payload: Any, ctx: Context) -> Any:
        spec = self._spec
        if spec.is_async:
            return await spec.invoke(payload, ctx)
        return await anyio.to_thread.run_sync(
            spec.invoke, payload, ctx, limiter=self._thread_limiter, abandon_on_cancel=True
        )

    async def _publish_outputs(
        self, envelope: Envelope[Any], output: Any, *, replied: bool, lane: Lane
    ) -> list[tuple[str, str]]:
        """Publish the handler's return value to `publishes=` and `reply_to`; returns `(topic,
        event id)` of each event published."""
        reply_to = None if replied else envelope.reply_to
        publishes = self._spec.publishes if output is not None else None
        targets = [t for t in (publishes, reply_to) if t is not None]
        if not targets:
            return []
        entries = []
        published = []
        for topic in targets:
            # Checked like any publish: `reply_to` is the publisher's choice, and an agent of
            # this app may declare another type for that topic than this handler returns.
            self._app.check_payload(topic, output, validated_as=self._spec.return_type)
            event_id, data = self._app._encode(
                topic,
                output,
                correlation_id=envelope.correlation_id,
                causation_id=envelope.id,
                reply_to=None,
                webhook=None,
                tenant_id=envelope.tenant_id,
                headers=None,
            )
            published.append((topic, event_id))
            if lane != "normal" and not is_request_reply(topic):
                # The handler's return value keeps the event's priority.
                topic = await self._app._bus_topic(topic, lane)
            entries.append((topic, data))
        if reply_to is not None and is_request_reply(reply_to):
            # The reply (last of the targets) only goes to a request that still waits for it.
            *entries, (_, reply) = entries
            if entries:
                await self._broker.publish_many(entries)
            await self._send_reply(envelope.id, reply_to, reply)
            return published
        await self._broker.publish_many(entries)
        return published
