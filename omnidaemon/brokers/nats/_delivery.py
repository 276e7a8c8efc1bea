"""Settling on NATS, leases and group membership.

- **Settles**: `+ACK`; retries are `-NAK {"delay": ns}` (redelivered to this agent's consumer
  only, with the delivery count one higher: atomic on the server); dead letters are a write to
  the topic's dead-letter stream with a message id, then `+TERM`.
- **Leases** are the consumer's AckWait, renewed with `+WPI`. `reclaim` (in `_fetching`) sets
  AckWait to the agent's `reclaim_idle`.
- **Lost deliveries.** JetStream accepts the ack of an entry from whoever sends it, even from a
  consumer whose lease ran out and whose entry went to another. So each entry handed out
  again is *marked* with its new delivery count (`_write_marks`), and a retry, dead letter or
  renewal of a delivery whose lease may have run out (not renewed for half the AckWait) first
  reads the mark: a higher count means another consumer holds it now, and this one reports it
  lost and settles nothing. A delivery renewed recently cannot have been handed out again, so
  the hot path reads nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from omnidaemon.brokers.base import Delivery, Renewal, Subscription
from omnidaemon.brokers.nats._core import Held, Reader
from omnidaemon.brokers.nats._fetching import (
    ATTEMPT_HEADER,
    NatsFetching,
    ack_reply_info,
    is_status,
)
from omnidaemon.brokers.nats._names import encode
from omnidaemon.brokers.nats._publishing import schedule_headers
from omnidaemon.brokers.nats._traces import NatsTraces
from omnidaemon.brokers.nats._values import _together
from omnidaemon.brokers.traces import TraceNotWritten, TraceWrite

__all__ = ["NatsDelivery"]


class NatsDelivery(NatsFetching, NatsTraces):
    """The settles, `extend`, and the group membership of `NatsBroker`'s consumers."""

    # Settling ------------------------------------------------------------------------------

    async def _still_held(self, sub: Subscription, delivery: Delivery) -> bool:
        """Whether `delivery.consumer` still holds the delivery (see the module docs)."""
        delivered, seq = ack_reply_info(delivery.origin)
        reader = self._readers.get((sub, delivery.consumer))
        held = reader.held.get(seq) if reader is not None else None
        if reader is not None and (held is None or held.delivered != delivered):
            return False  # settled already, or handed out again to another reader here
        lease = self._groups.get(sub, self._lease)
        if held is not None and anyio.current_time() - held.renewed_at < lease / 2:
            return True
        mark = await self._read_mark(sub, seq)
        return mark is None or mark <= delivered

    def _release(self, sub: Subscription, delivery: Delivery) -> None:
        reader = self._readers.get((sub, delivery.consumer))
        if reader is not None:
            reader.held.pop(int(delivery.id), None)

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        client = await self._nc()
        readers = [r for _, r in self._readers_of(sub)] if deliveries else []
        # As on Redis, an ack settles the entry whoever holds it now: the handler finished,
        # so a worker that took it over has nothing left to do.
        for delivery in deliveries:
            await client.publish(delivery.origin, b"+ACK")
            seq = int(delivery.id)
            for reader in readers:
                reader.held.pop(seq, None)
        # The trace's messages and the metrics' are all sent before any answer is awaited:
        # one round trip for both (`_traces`).
        writes: list[Awaitable[None]] = []
        trace_failures: list[Exception] = []

        async def write_trace(trace: TraceWrite) -> None:
            try:
                await self._write_trace(trace)
            except Exception as exc:  # reported after the acks and counts are done
                trace_failures.append(exc)

        if trace:
            writes.append(write_trace(trace))
        if stats:
            writes.append(self._add_stats(sub, stats))
        await _together(writes)
        if deliveries:
            await self._flush()  # the server has every ack when this returns
        if trace_failures:
            failure = trace_failures[0]
            raise TraceNotWritten(f"trace records not written: {failure}") from failure

    async def retry(
        self,
        sub: Subscription,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        if not trimmed and not await self._still_held(sub, delivery):
            self._release(sub, delivery)  # never handed back by `recover`: it is another's
            return False
        client = await self._nc()
        following = delivery.attempt + 1 if attempt is None else attempt
        if not trimmed:
            # An entry trimmed from the stream while its handler ran cannot be redelivered:
            # the delivery's own copy of it is scheduled instead (a retry is rare enough to
            # afford the look).
            _, seq = ack_reply_info(delivery.origin)
            trimmed = not await self._has_entry(self._names.stream(sub.topic), seq)
        if following == delivery.attempt + 1 and not trimmed:
            # The server redelivers to this agent alone, `delay` from now, with the delivery
            # count (the attempt) one higher: settling and scheduling in one step.
            # Marked first, so that whoever gets it next sees a retry, not a takeover.
            delivered, seq = ack_reply_info(delivery.origin)
            await self._write_marks(sub, [(seq, delivered + 1)])
            nak = b"-NAK " + json.dumps({"delay": int(max(delay, 0.0) * 1e9)}).encode()
            await client.publish(delivery.origin, nak)
            await self._flush()
        else:
            # Another attempt number (a deferral), or an entry gone from the stream: a copy for
            # this agent alone, then the delivery ended. The copy's message id makes a repeat
            # of this step (after a crash between the two) store it once.
            await self._for_group_alone(sub, delivery, following, delay)
            await client.publish(delivery.origin, b"+TERM")
            await self._flush()
        self._release(sub, delivery)
        return True

    async def _for_group_alone(
        self, sub: Subscription, delivery: Delivery, attempt: int, delay: float
    ) -> None:
        names = self._names
        target = names.group_entries(sub.topic, sub.group)
        delivered, seq = ack_reply_info(delivery.origin)
        headers = {
            ATTEMPT_HEADER: str(attempt),
            "Nats-Msg-Id": f"again:{sub.group}:{seq}:{delivered}:{attempt}",
        }
        subject = target
        if delay > 0:
            subject = names.delayed(sub.topic, f"{encode(sub.group)}-{seq}-{delivered}")
            headers |= schedule_headers(delay, target)
        await self._ensure_topic(sub.topic)
        await self._publish(subject, delivery.data, headers)

    async def dead_letter(
        self, sub: Subscription, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        if not trimmed and not await self._still_held(sub, delivery):
            self._release(sub, delivery)  # never handed back by `recover`: it is another's
            return False
        await self._ensure_dlq(sub.topic)
        delivered, seq = ack_reply_info(delivery.origin)
        # The message id makes the write idempotent: repeated after a crash before the
        # `+TERM`, the record is stored once.
        headers = {"Nats-Msg-Id": f"dead:{sub.group}:{seq}:{delivered}"}
        await self._publish(self._names.dlq(sub.topic, sub.group), record, headers)
        if not trimmed:
            client = await self._nc()
            await client.publish(delivery.origin, b"+TERM")
            await self._flush()
        self._release(sub, delivery)
        return True

    # Leases -------------------------------------------------------------------------------

    async def extend(
        self, sub: Subscription, consumer: str, deliveries: Sequence[Delivery]
    ) -> Renewal:
        client = await self._nc()
        reader = self._readers.get((sub, consumer))
        lost: list[Delivery] = []
        renewed: list[Held] = []
        for delivery in deliveries:
            if not await self._still_held(sub, delivery):
                self._release(sub, delivery)
                lost.append(delivery)
                continue
            await client.publish(delivery.origin, b"+WPI")
            held = reader.held.get(int(delivery.id)) if reader is not None else None
            if held is not None:
                renewed.append(held)
        started = anyio.current_time()
        await self._flush()
        for held in renewed:
            held.renewed_at = started
        if reader is not None:
            await self._renew_parked(sub, reader)
            await self._refresh_registry(sub, consumer, reader)
        return Renewal(lost=tuple(lost))

    # Group membership -----------------------------------------------------------------------

    async def remove_consumer(self, sub: Subscription, consumer: str) -> bool:
        if not await self._drop_reader(sub, consumer):
            return False
        await self._unregister(sub, consumer)
        return True

    async def _drop_reader(self, sub: Subscription, consumer: str) -> bool:
        """Forget this process's reader of `consumer` unless it holds deliveries; whether it
        held none. What the server pushed to it that was never handed out is given back first
        (see `_give_back`)."""
        reader = self._readers.get((sub, consumer))
        if reader is None:
            return True
        if reader.held:
            return False
        await self._give_back(sub, consumer, reader)
        if reader.held:
            return False
        del self._readers[(sub, consumer)]
        reader.interrupted.set()
        # A closed connection took the subscription with it.
        with contextlib.suppress(Exception):
            await reader.sub.unsubscribe()
        return True

    async def _give_back(self, sub: Subscription, consumer: str, reader: Reader) -> None:
        """Return to the group, without charging an attempt, what the server pushed to a
        reader that is going away and that no fetch handed out: entries answering a waiting
        request of an interrupted fetch (waited for until that request expires), since left
        to the server they would come back after AckWait as a further attempt."""
        end = reader.waiting_until + 0.25  # its answer may still be on its way
        while reader.waiting is not None and anyio.current_time() < end:
            reader.arrived = anyio.Event()
            with anyio.move_on_after(end - anyio.current_time()):
                await reader.arrived.wait()
        reader.waiting = None
        for delivery in await self._hand_out(
            sub, consumer, reader, self._take_buffered(reader, len(reader.buffer))
        ):
            # The same attempt again, for this agent alone; the delivery ended.
            await self.retry(sub, delivery, 0.0, attempt=delivery.attempt)

    async def close(self) -> None:
        if self._client is not None and self._client.is_connected:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3.0):
                for (sub, consumer), reader in list(self._readers.items()):
                    # Not waiting for requests still open: `remove_consumer` (a stopping
                    # worker's last call) did; here only what already came is given back.
                    reader.waiting = None
                    if any(is_status(m) is None for m, _ in reader.buffer):
                        with contextlib.suppress(Exception):
                            await self._give_back(sub, consumer, reader)
        await super().close()

    async def prune_consumers(
        self,
        sub: Subscription,
        min_idle: float,
        *,
        alive: Callable[[str], Awaitable[bool]] | None = None,
    ) -> list[str]:
        # On JetStream a consumer's name holds nothing: what it held is the server's, handed
        # out again after AckWait. Removing a dead one from the registry loses nothing.
        removed = []
        for name, (_pending, idle) in sorted((await self._registered(sub)).items()):
            if idle <= min_idle:
                continue
            if alive is not None and await alive(name):
                continue
            if not await self._drop_reader(sub, name):
                continue
            await self._unregister(sub, name)
            removed.append(name)
        return removed
