"""Fetching on NATS: pull requests on an agent's durable consumer, and takeovers.

- **Fetch** sends one pull request (`CONSUMER.MSG.NEXT`, `no_wait` with `expires`: it waits
  for the first entry, then returns what is there and ends) with a reply subject under the
  reader's own inbox; waits are cut in slices of `_LONGEST_WAIT`, so a reader that stops
  leaves no request open for long. Everything the server pushes to the inbox, even for an
  earlier request that was interrupted or cancelled, is kept in the reader's buffer and
  handed out by the next fetch or `recover`: nothing delivered is dropped.
- **Attempts** are the server's delivery count (`$JS.ACK.<stream>.<consumer>.<count>.<seq>...`),
  plus the `Omni-Attempt` header of entries published for one agent alone (replays, deferrals).
- **Takeovers.** The server hands an entry out again once its lease (the consumer's AckWait)
  was not renewed for that long, to whichever reader pulls next. An entry handed out again
  that its retry did not mark is a takeover: it is marked with its new delivery count (so that
  the consumer that lost it settles nothing, see `_delivery`) and parked for `reclaim`, which
  hands it out as the worker expects a takeover (logged, on its last attempt run alone).
  While parked it is no attempt (`_write_free`): if this worker dies before handing it out,
  the next delivery of it has the same attempt number.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from nats.aio.msg import Msg

from omnidaemon.brokers.base import Delivery, Reclaimed, Subscription
from omnidaemon.brokers.nats._core import Held, Reader
from omnidaemon.brokers.nats._streams import NatsParts
from omnidaemon.observability.logging import get_logger

__all__ = ["ATTEMPT_HEADER", "NatsFetching", "ack_reply_info", "is_status"]

_log = get_logger("omnidaemon.broker")

_REGISTER_EVERY = 5.0  # seconds between writes of a busy consumer's registry entry
_NO_WAIT_REPLY = 5.0  # seconds a no-wait pull may take to answer
_LONGEST_WAIT = 0.5  # seconds one pull request waits for entries (a fetch may send several)
ATTEMPT_HEADER = "Omni-Attempt"


def ack_reply_info(reply: str) -> tuple[int, int]:
    """`(delivery count, stream sequence)` from a JetStream message's reply subject (the v1
    form `$JS.ACK.<stream>.<consumer>.<count>.<seq>...` and the v2 form with a domain and an
    account hash before the stream)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


def is_status(msg: Msg) -> str | None:
    headers = msg.headers
    return headers.get("Status") if headers and not msg.data else None


class NatsFetching(NatsParts):
    """`subscribe`, `fetch`, `interrupt`, `reclaim`, `recover`."""

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
        deadline = anyio.current_time() + timeout
        while len(msgs) < count:
            # One request: with `expires` it waits for the first entry, then (`no_wait`)
            # returns with what is there and ends. Waits are cut in slices so that a reader
            # that stops (an interrupted fetch) leaves no request open for long.
            remaining = deadline - anyio.current_time()
            wait = min(remaining, _LONGEST_WAIT) if not msgs and remaining > 0 else None
            msgs += await self._pull(sub, reader, count - len(msgs), wait=wait)
            if msgs or wait is None or reader.interrupted.is_set():
                break
        await self._renew_parked(sub, reader)
        return await self._hand_out(sub, consumer, reader, msgs, park=True)

    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        reader = self._readers.get((sub, consumer))
        if reader is not None:
            reader.interrupted.set()
            reader.arrived.set()

    def _take_buffered(self, reader: Reader, count: int) -> list[tuple[Msg, float]]:
        """Up to `count` entries the server pushed earlier (statuses of past requests are
        dropped: they answered requests nobody waits for any more)."""
        taken: list[tuple[Msg, float]] = []
        kept: list[tuple[Msg, float]] = []
        for item in reader.buffer:
            if is_status(item[0]) is not None:
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
        body: dict[str, object] = {"batch": batch, "no_wait": True}
        if wait is not None:
            body["expires"] = int(wait * 1e9)
            reader.waiting, reader.waiting_until = reply, anyio.current_time() + wait
        stream, durable = self._names.stream(sub.topic), self._names.consumer(sub.group)
        await client.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", json.dumps(body).encode(), reply=reply
        )
        deadline = anyio.current_time() + (_NO_WAIT_REPLY if wait is None else wait + 1.0)
        got: list[tuple[Msg, float]] = []
        while True:
            # A fresh event before the buffer is read: a message or an interrupt that comes
            # after this look sets it (no await until the wait below).
            reader.arrived = anyio.Event()
            buffered, reader.buffer = reader.buffer, []
            done = missing = False
            for item in buffered:
                status = is_status(item[0])
                if status is None:
                    got.append(item)
                elif item[0].subject == reply and status != "100":
                    done = True  # 404 no more, 408 expired, 409 ended for a reason
                    missing = status == "503" or (
                        status == "409"
                        and "Deleted" in (item[0].headers or {}).get("Description", "")
                    )
            if done or len(got) >= batch or reader.interrupted.is_set():
                break
            now = anyio.current_time()
            if now >= deadline:
                break
            with anyio.move_on_after(deadline - now):
                await reader.arrived.wait()
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
        deliveries: list[Delivery] = []
        again: list[tuple[int, int, int, Msg]] = []
        others = [r for name, r in self._readers_of(sub) if name != consumer]
        for msg, arrived in msgs:
            delivered, seq = ack_reply_info(msg.reply)
            for other in others:
                other.held.pop(seq, None)  # it lost the entry: the server handed it out again
            if delivered > 1:
                again.append((len(deliveries), seq, delivered, msg))
                deliveries.append(Delivery("", b"", 0))  # made below, with what was not run
                continue
            base = int((msg.headers or {}).get(ATTEMPT_HEADER, "1"))
            delivery = Delivery(str(seq), msg.data, base, msg.reply, consumer)
            reader.held[seq] = Held(delivery, delivered, arrived)
            deliveries.append(delivery)
        if again:
            marks, frees = await asyncio.gather(
                asyncio.gather(*(self._read_mark(sub, seq) for _, seq, _, _ in again)),
                asyncio.gather(*(self._read_free(sub, seq) for _, seq, _, _ in again)),
            )
            taken: list[tuple[int, int, int]] = []
            arrivals = {id(m): t for m, t in msgs}
            for (i, seq, delivered, msg), mark, free in zip(again, marks, frees, strict=True):
                base = int((msg.headers or {}).get(ATTEMPT_HEADER, "1"))
                attempt = base + delivered - 1 - free
                delivery = Delivery(str(seq), msg.data, attempt, msg.reply, consumer)
                held = Held(delivery, delivered, arrivals[id(msg)], free)
                deliveries[i] = delivery
                reader.held[seq] = held
                if mark is None or mark < delivered:
                    taken.append((i, seq, delivered))
                    held.parked = park
            if taken:
                writes = [self._write_marks(sub, [(seq, d) for _, seq, d in taken])]
                if park:
                    # Not run while it waits here: if this worker dies meanwhile, the next
                    # delivery of it is no attempt either.
                    writes += [
                        self._write_free(sub, seq, reader.held[seq].free + 1) for _, seq, _ in taken
                    ]
                await asyncio.gather(*writes)
                if park:
                    parked = {i for i, _, _ in taken}
                    reader.parked += [d for i, d in enumerate(deliveries) if i in parked]
                    deliveries = [d for i, d in enumerate(deliveries) if i not in parked]
        await self._refresh_registry(sub, consumer, reader, force=not deliveries)
        return deliveries

    async def _unpark(self, sub: Subscription, reader: Reader, deliveries: list[Delivery]) -> None:
        """Parked takeovers about to run: their deliveries count as attempts again."""
        writes = []
        for delivery in deliveries:
            held = reader.held.get(int(delivery.id))
            if held is not None and held.parked:
                held.parked = False
                writes.append(self._write_free(sub, int(delivery.id), held.free))
        if writes:
            await asyncio.gather(*writes)

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

    # Takeovers ------------------------------------------------------------------------------

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
        await self._unpark(sub, reader, taken)
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
        await self._unpark(sub, reader, held)
        return held
