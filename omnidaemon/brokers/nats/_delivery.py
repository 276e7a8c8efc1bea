"""Fetching and settling on NATS: a durable pull consumer per agent, explicit acks.

- **Fetch** sends pull requests (`CONSUMER.MSG.NEXT`) with a reply subject under the reader's
  own inbox: first `no_wait` for what is there, then, if nothing was, one waiting request for a
  single entry (so that entries arriving later are not pushed to a reader that stopped asking),
  then `no_wait` again for the rest of the batch. Everything the server pushes to the inbox,
  even for an earlier request that was interrupted or cancelled, is kept in the reader's
  buffer and handed out by the next fetch or `recover`: nothing delivered is dropped.
- **Attempts** are the server's delivery count (`$JS.ACK.<stream>.<consumer>.<count>.<seq>...`),
  plus the `Omni-Attempt` header of entries published for one agent alone (replays, deferrals).
- **Leases** are the consumer's AckWait: the server hands an entry out again once it was not
  renewed (`+WPI`) for that long. `reclaim` sets AckWait to the agent's `reclaim_idle`; the
  takeover itself comes with the next pull. Retries are `-NAK {"delay": ns}` (to this agent's
  consumer only; atomic on the server).
- **Lost deliveries.** JetStream accepts the ack of an entry from whoever sends it, even from a
  consumer whose lease ran out and whose entry went to another. So each entry handed out
  again is *marked* with its new delivery count (`_write_marks`), and a settle or renewal of a
  delivery whose lease may have run out (not renewed for half the AckWait) first reads the
  mark: a higher count means another consumer holds it now, and this one reports it lost and
  settles nothing. A delivery renewed recently cannot have been handed out again, so the hot
  path reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
from nats.aio.msg import Msg

from omnidaemon.brokers.base import Delivery, Reclaimed, Renewal, Subscription
from omnidaemon.brokers.nats._core import Held, NatsParts, Reader
from omnidaemon.brokers.nats._names import encode
from omnidaemon.brokers.nats._publishing import schedule_headers
from omnidaemon.observability.logging import get_logger

__all__ = ["NatsDelivery", "ack_reply_info"]

_log = get_logger("omnidaemon.broker")

_REGISTER_EVERY = 5.0  # seconds between writes of a busy consumer's registry entry
_NO_WAIT_REPLY = 5.0  # seconds a no-wait pull may take to answer
_ATTEMPT = "Omni-Attempt"


def ack_reply_info(reply: str) -> tuple[int, int]:
    """`(delivery count, stream sequence)` from a JetStream message's reply subject (the v1
    form `$JS.ACK.<stream>.<consumer>.<count>.<seq>...` and the v2 form with a domain and an
    account hash before the stream)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers and not msg.data else None


class NatsDelivery(NatsParts):
    """`subscribe`, `fetch`, `interrupt`, the settles, leases, and group membership."""

    async def subscribe(self, sub: Subscription) -> None:
        await self._ensure_group(sub)

    # Fetching -------------------------------------------------------------------------------

    async def fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        await self._ensure_group(sub)
        reader = await self._reader(sub, consumer)
        reader.interrupted = anyio.Event()
        msgs = self._take_buffered(reader, count)
        if len(msgs) < count:
            msgs += await self._pull(sub, reader, count - len(msgs), wait=None)
        if not msgs and timeout > 0:
            msgs = await self._pull(sub, reader, 1, wait=timeout)
            if msgs and count > 1:
                msgs += await self._pull(sub, reader, count - 1, wait=None)
        await self._renew_parked(sub, reader)
        return await self._hand_out(sub, consumer, reader, msgs, park=True)

    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        reader = self._readers.get((sub, consumer))
        if reader is not None:
            reader.interrupted.set()

    def _take_buffered(self, reader: Reader, count: int) -> list[tuple[Msg, float]]:
        """Up to `count` entries the server pushed earlier (statuses of past requests are
        dropped: they answered requests nobody waits for any more)."""
        taken: list[tuple[Msg, float]] = []
        kept: list[tuple[Msg, float]] = []
        for item in reader.buffer:
            if _status(item[0]) is not None:
                continue
            (taken if len(taken) < count else kept).append(item)
        reader.buffer = kept
        return taken

    async def _pull(
        self, sub: Subscription, reader: Reader, batch: int, *, wait: float | None
    ) -> list[tuple[Msg, float]]:
        """One pull request for up to `batch` entries: `no_wait` (`wait` None), or waiting up to
        `wait` seconds for them (returning early when interrupted). A consumer found missing
        (the bus lost it) is made again and asked once more."""
        for _ in range(2):
            got, missing = await self._pull_once(sub, reader, batch, wait)
            if not missing:
                return got
            self._forget(sub.topic)
            await self._ensure_group(sub)
            _log.error(
                "the agent's consumer was missing on the bus and was created again: the bus "
                "lost its data (restarted without its store) or the topic was deleted; events "
                "it held are gone",
                topic=sub.topic,
                agent=sub.group,
            )
        return []

    async def _pull_once(
        self, sub: Subscription, reader: Reader, batch: int, wait: float | None
    ) -> tuple[list[tuple[Msg, float]], bool]:
        client = await self._nc()
        reader.request_seq += 1
        reply = f"{reader.inbox}.{reader.request_seq}"
        body: dict[str, object] = {"batch": batch}
        if wait is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(wait * 1e9)
        stream, durable = self._names.stream(sub.topic), self._names.consumer(sub.group)
        if wait is not None:
            reader.waiting, reader.waiting_until = reply, anyio.current_time() + wait
        await client.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", json.dumps(body).encode(), reply=reply
        )
        deadline = anyio.current_time() + (_NO_WAIT_REPLY if wait is None else wait + 1.0)
        got: list[tuple[Msg, float]] = []
        while True:
            buffered, reader.buffer = reader.buffer, []
            done = missing = False
            for item in buffered:
                status = _status(item[0])
                if status is None:
                    got.append(item)
                elif item[0].subject == reply and status != "100":
                    done = True  # 404 nothing there, 408 expired, 409 ended for a reason
                    missing = status == "503" or (
                        status == "409"
                        and "Deleted" in (item[0].headers or {}).get("Description", "")
                    )
            if done or len(got) >= batch or reader.interrupted.is_set():
                break
            now = anyio.current_time()
            if now >= deadline:
                break
            reader.arrived = anyio.Event()
            if reader.buffer:
                continue
            with anyio.move_on_after(deadline - now):
                async with anyio.create_task_group() as tg:

                    async def stop_when_interrupted() -> None:
                        await reader.interrupted.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(stop_when_interrupted)
                    await reader.arrived.wait()
                    tg.cancel_scope.cancel()
        if len(got) > batch:  # pushed for earlier requests: kept for the next fetch
            reader.buffer[:0] = got[batch:]
            got = got[:batch]
        return got, missing

    async def _hand_out(
        self,
        sub: Subscription,
        consumer: str,
        reader: Reader,
        msgs: list[tuple[Msg, float]],
        *,
        park: bool = False,
    ) -> list[Delivery]:
        """Deliveries of pulled messages, held by `consumer` from now on (and by no other
        reader of this process).

        An entry handed out again is a retry if its retry marked it so, else a takeover (the
        lease of whoever held it ran out): a takeover is marked (see the module docs) and,
        with `park`, kept back for `reclaim` instead of returned.
        """
        deliveries = []
        again: list[tuple[int, int, Delivery]] = []
        others = [r for name, r in self._readers_of(sub) if name != consumer]
        for msg, arrived in msgs:
            delivered, seq = ack_reply_info(msg.reply)
            base = int((msg.headers or {}).get(_ATTEMPT, "1"))
            delivery = Delivery(str(seq), msg.data, base + delivered - 1, msg.reply, consumer)
            for other in others:
                other.held.pop(seq, None)  # it lost the entry: the server handed it out again
            reader.held[seq] = Held(delivery, delivered, arrived)
            deliveries.append(delivery)
            if delivered > 1:
                again.append((seq, delivered, delivery))
        if again:
            marks = await asyncio.gather(*(self._read_mark(sub, seq) for seq, _, _ in again))
            taken = [
                (seq, delivered, delivery)
                for (seq, delivered, delivery), mark in zip(again, marks, strict=True)
                if mark is None or mark < delivered
            ]
            if taken:
                await self._write_marks(sub, [(seq, delivered) for seq, delivered, _ in taken])
                if park:
                    parked = {id(delivery) for _, _, delivery in taken}
                    reader.parked += [d for d in deliveries if id(d) in parked]
                    deliveries = [d for d in deliveries if id(d) not in parked]
        await self._refresh_registry(sub, consumer, reader, force=not deliveries)
        return deliveries

    async def _renew_parked(self, sub: Subscription, reader: Reader) -> None:
        """Renew the leases of parked takeovers (the worker does not know them yet) once a
        third of their AckWait passed."""
        if not reader.parked:
            return
        client = await self._nc()
        started = anyio.current_time()
        renewed = []
        lease = self._groups.get(sub, self._lease)
        for delivery in reader.parked:
            held = reader.held.get(int(delivery.id))
            if held is None:
                continue
            if started - held.renewed_at >= lease / 3:
                await client.publish(delivery.origin, b"+WPI")
                renewed.append(held)
        if renewed:
            await self._flush()
            for held in renewed:
                held.renewed_at = started

    async def _refresh_registry(
        self, sub: Subscription, consumer: str, reader: Reader, *, force: bool = False
    ) -> None:
        now = anyio.current_time()
        if now - reader.registered_at >= _REGISTER_EVERY or (force and reader.registered_at < 0):
            reader.registered_at = now
            await self._register(sub, consumer, len(reader.held))

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
        if stats:
            await self._add_stats(sub, stats)
        if deliveries:
            await self._flush()  # the server has every ack when this returns

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
            _ATTEMPT: str(attempt),
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

    async def reclaim(
        self,
        sub: Subscription,
        consumer: str,
        min_idle: float,
        count: int,
        *,
        hold_back: int | None = None,
    ) -> Reclaimed:
        # The server takes over what was not renewed for AckWait by itself: AckWait is made
        # the agent's `min_idle`. Deliveries held by other readers of this process are
        # handed back at once when their lease is that old (the server cannot know them
        # apart from live ones before AckWait).
        if min_idle > 0:
            await self._set_ack_wait(sub, max(min_idle, 0.05))
        else:
            await self._ensure_group(sub)
        client = await self._nc()
        now = anyio.current_time()
        given_back = 0
        for name, other in self._readers_of(sub):
            if name == consumer:
                continue
            for held in other.held.values():
                if now - held.renewed_at >= min_idle:
                    await client.publish(held.delivery.origin, b"-NAK")
                    given_back += 1
        if given_back:
            await self._flush()
        reader = await self._reader(sub, consumer)
        msgs = self._take_buffered(reader, count)
        if len(msgs) < count:
            wait = 1.0 if given_back else None
            batch = min(count - len(msgs), given_back or count)
            msgs += await self._pull(sub, reader, batch, wait=wait)
        # What the pull handed out for the first time goes back to the buffer, for the next
        # fetch; takeovers join those fetches parked.
        reader.buffer[:0] = [(m, t) for m, t in msgs if ack_reply_info(m.reply)[0] <= 1]
        again = [(m, t) for m, t in msgs if ack_reply_info(m.reply)[0] > 1]
        await self._hand_out(sub, consumer, reader, again, park=True)
        taken, kept = Reclaimed(), []
        for delivery in reader.parked:
            if int(delivery.id) not in reader.held:
                continue  # settled meanwhile, or handed out again to another reader
            if len(taken) >= count:
                kept.append(delivery)
            elif hold_back is not None and delivery.attempt == hold_back:
                kept.append(delivery)  # for an idle worker: this one's renews it meanwhile
                taken.held_back += 1
            else:
                taken.append(delivery)
        reader.parked = kept
        await self._renew_parked(sub, reader)
        return taken

    async def recover(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        reader = self._readers.get((sub, consumer))
        if reader is None:
            return []
        held = [h.delivery for h in reader.held.values()][:count]
        if len(held) < count:
            buffered = self._take_buffered(reader, count - len(held))
            held += await self._hand_out(sub, consumer, reader, buffered)
        handed = {id(d) for d in held}
        reader.parked = [d for d in reader.parked if id(d) not in handed]
        return held

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
        end = reader.waiting_until + 0.5
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
                    if any(_status(m) is None for m, _ in reader.buffer):
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
