"""Consuming on the Redis broker: subscribing, fetching (with due retries and delayed events),
settling (ack, retry, dead letter), lease renewal, and taking over others' pending entries."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
from redis.exceptions import NoScriptError, ResponseError

from omnidaemon.brokers import _redis_scripts as scripts
from omnidaemon.brokers.base import Delivery, Reclaimed, Renewal, Subscription
from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT, _log
from omnidaemon.brokers.redis._keys import _RETRY, _STREAM, _decode, _field, _is_nogroup
from omnidaemon.brokers.redis._traces import RedisTraces
from omnidaemon.brokers.traces import TraceNotWritten, TraceWrite
from omnidaemon.metrics import is_extreme

__all__ = ["RedisDelivery"]

_RETRY_CHECK_INTERVAL = 0.05  # seconds between looks at the due-retry set while busy
_MAX_BLOCK_MS = 5_000


class RedisDelivery(RedisTraces):
    """The consuming commands of `RedisBroker`."""

    async def subscribe(self, sub: Subscription) -> None:
        start = "$" if sub.start == "latest" else "0"
        for key, first in ((self.stream_key(sub.topic), start), (self.retry_key(sub), "0")):
            try:
                if self._cluster is None:
                    await self.client.xgroup_create(key, sub.group, id=first, mkstream=True)
                else:  # on a connection of the broker's own, which follows ASK (see `_script`)
                    command = ("XGROUP", "CREATE", key, sub.group, first, "MKSTREAM")
                    await self._direct(command, key=key, timeout=_SOCKET_TIMEOUT)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def remove_consumer(self, sub: Subscription, consumer: str) -> bool:
        removed = await self._script(
            "REMOVE_CONSUMER",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, consumer],
        )
        return bool(removed)

    async def prune_consumers(
        self,
        sub: Subscription,
        min_idle: float,
        *,
        alive: Callable[[str], Awaitable[bool]] | None = None,
    ) -> list[str]:
        found = await self._script(
            "PRUNE_CONSUMERS",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, max(0, int(min_idle * 1000)), "0" if alive is None else "1"],
        )
        names = sorted(_decode(name) for name in found)
        if alive is None:
            return names
        # Listed only: each is removed on its own, with its pending check, unless it lives.
        return [n for n in names if not await alive(n) and await self.remove_consumer(sub, n)]

    async def fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        deadline = anyio.current_time() + timeout
        owner = (sub, consumer)
        self._interrupted.discard(owner)
        try:
            while True:
                # One pass blocks until the deadline or the next known retry falls due.
                deliveries = await self._fetch(
                    sub, consumer, count, deadline - anyio.current_time()
                )
                if deliveries or anyio.current_time() >= deadline:
                    return deliveries
                if owner in self._interrupted:  # `interrupt`: return now, with nothing
                    self._interrupted.discard(owner)
                    return deliveries
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            await self._regroup(sub)
            return []

    async def _fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        block_ms = min(_MAX_BLOCK_MS, max(0, int(timeout * 1000)))
        now = anyio.current_time()
        checked_at, next_due = self._retry_state.get(sub, (-math.inf, math.inf))
        # The due-retry set is looked at every few ms while busy, and whenever a retry known
        # to this worker falls due; other workers' retries are seen within one fetch timeout.
        if now - checked_at >= _RETRY_CHECK_INTERVAL or next_due <= now:
            entries, wait_ms = await self._script(
                "FETCH_RETRIES",
                keys=[
                    self.due_key(sub),
                    self.retry_key(sub),
                    self.delayed_key(sub.topic),
                    self.stream_key(sub.topic),
                ],
                args=[sub.group, consumer, count, self._maxlen_of(sub.topic)],
            )
            deliveries = [self._retry_delivery(entry, consumer) for entry in entries]
            next_due = now + int(wait_ms) / 1000 if int(wait_ms) >= 0 else math.inf
            self._retry_state[sub] = (-math.inf if deliveries else now, next_due)
        if not deliveries and next_due < math.inf:
            block_ms = min(block_ms, max(0, math.ceil((next_due - now) * 1000)))
        if len(deliveries) >= count:
            return deliveries
        args: list[Any] = ["XREADGROUP", "GROUP", sub.group, consumer, "COUNT"]
        args.append(count - len(deliveries))
        if not deliveries and block_ms > 0:
            args += ("BLOCK", block_ms)
        stream = self.stream_key(sub.topic)
        args += ("STREAMS", stream, ">")
        # [[stream, [[id, [field, value, ...]], ...]]] with RESP2, {stream: [...]} with RESP3.
        response = await self._direct(
            args,
            key=stream,
            owner=(sub, consumer),
            timeout=block_ms / 1000 + _SOCKET_TIMEOUT,
        )
        if not response:
            return deliveries
        for entries in response.values() if isinstance(response, dict) else (response[0][1],):
            for entry_id, flat in entries:
                data = flat[1] if flat and flat[0] == b"e" else _field(flat, b"e")
                deliveries.append(Delivery(entry_id.decode(), data, 1, _STREAM, consumer))
        return deliveries

    @staticmethod
    def _retry_delivery(entry: Any, consumer: str) -> Delivery:
        entry_id, flat = entry[0], entry[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        attempt = int(fields.get(b"a", b"2"))
        return Delivery(_decode(entry_id), fields.get(b"e", b""), attempt, _RETRY, consumer)

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        if not deliveries and not stats and not trace:
            return
        from_stream = [d.id for d in deliveries if d.origin != _RETRY]
        from_retry = [d.id for d in deliveries if d.origin == _RETRY]
        commands: list[tuple[Any, ...]] = []
        if from_stream:
            commands.append(("XACK", self.stream_key(sub.topic), sub.group, *from_stream))
        if from_retry:
            # Retry entries are read by this group alone: once settled they can go.
            commands.append(("XACK", self.retry_key(sub), sub.group, *from_retry))
            commands.append(("XDEL", self.retry_key(sub), *from_retry))
        if stats:
            key = self.metrics_key(sub)
            extremes: list[str | int] = []
            for name, value in stats.items():
                if is_extreme(name):
                    extremes += (name, value)
                else:
                    commands.append(("HINCRBY", key, name, value))
            if extremes:
                commands.append(("EVAL", scripts.KEEP_EXTREMES, 1, key, *extremes))
        trace_errors: list[Any] = []
        if not trace:
            errors = await self._settle(sub, commands)
        elif self._cluster is not None:
            # A cluster spreads runs over slots: their writes go to each node at once, beside
            # the acks (one round trip, in parallel).
            errors, trace_errors = await self._settle_and_trace(
                sub, commands, self.trace_commands(trace)
            )
        else:
            errors, trace_errors = await self._settle_traced(sub, commands, trace)
        if any(isinstance(e, ResponseError) and _is_nogroup(e) for e in errors):
            # Nothing is pending in a group that is gone: these acks have nothing to settle.
            await self._regroup(sub)
        elif errors:
            raise errors[0]
        if trace_errors:
            raise TraceNotWritten(f"trace records not written: {trace_errors[0]}") from (
                trace_errors[0]
            )

    async def _settle_traced(
        self, sub: Subscription, commands: list[tuple[Any, ...]], trace: TraceWrite
    ) -> tuple[list[Any], list[Any]]:
        """On one server: the ack's commands and the trace's in one round trip; the
        error replies of each."""
        trace_errors: list[Any] = []
        replies = await self._exchange(
            commands,
            key=self.stream_key(sub.topic),
            timeout=_SOCKET_TIMEOUT + self._replica_wait,
            replicate="settle",
            packed=self.packed_trace(trace),
            packed_errors=trace_errors,
            raise_errors=False,
        )
        if any(isinstance(e, NoScriptError) or "NOSCRIPT" in str(e) for e in trace_errors):
            # The server lacks the script (restarted, or a new master): it refused it whole,
            # so the trace goes again with the script's text, which the server then keeps.
            trace_errors = []
            await self._exchange(
                (),
                key=self.stream_key(sub.topic),
                timeout=_SOCKET_TIMEOUT,
                packed=self.packed_trace(trace, by_digest=False),
                packed_errors=trace_errors,
            )
        return [r for r in replies if isinstance(r, Exception)], trace_errors

    async def _settle(self, sub: Subscription, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send an ack's commands to the server of the topic; the error replies.

        On a connection of the broker's own (`_exchange`), not through redis-py's pipeline:
        measured in the same run (`--cases traces`, both drains without traces), the drain
        was about 14 % faster this way. WAIT must follow these writes on that connection
        (`min_replicas`), and a cluster's ASK is followed on it.
        """
        if not commands:
            return []
        replies = await self._exchange(
            commands,
            key=self.stream_key(sub.topic),
            timeout=_SOCKET_TIMEOUT + self._replica_wait,
            replicate="settle",
            raise_errors=False,
        )
        return [reply for reply in replies if isinstance(reply, Exception)]

    async def _settle_and_trace(
        self,
        sub: Subscription,
        commands: list[tuple[Any, ...]],
        traced: list[tuple[str, tuple[Any, ...]]],
    ) -> tuple[list[Any], list[Any]]:
        """On a cluster: the ack's commands and the trace's, each group on its own node, all
        at once; the error replies of each."""
        errors: list[Any] = []
        trace_errors: list[Any] = []
        failed: list[BaseException] = []

        async def settle() -> None:
            try:
                errors.extend(await self._settle(sub, commands))
            except Exception as exc:  # raised as itself below, not in an ExceptionGroup
                failed.append(exc)

        async def write(key: str, group: list[tuple[Any, ...]]) -> None:
            try:
                replies = await self._exchange(
                    group, key=key, timeout=_SOCKET_TIMEOUT + self._replica_wait
                )
            except Exception as exc:  # reported as the trace's failure
                replies = [exc]
            trace_errors.extend(reply for reply in replies if isinstance(reply, Exception))

        async with anyio.create_task_group() as tg:
            tg.start_soon(settle)
            for key, group in self.by_node(traced):
                tg.start_soon(write, key, group)
        if failed:
            raise failed[0]  # callers catch bus errors by type
        return errors, trace_errors

    async def retry(
        self,
        sub: Subscription,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        unique = f"{self._unique_prefix}-{next(self._unique)}"
        next_attempt = delivery.attempt + 1 if attempt is None else attempt
        member = f"{next_attempt}\n{unique}\n".encode() + delivery.data
        settled = await self._group_script(
            sub,
            "RETRY",
            keys=[self._origin_key(sub, delivery.origin), self.due_key(sub)],
            args=[
                sub.group,
                delivery.id,
                max(0, int(delay * 1000)),
                member,
                "1" if delivery.origin == _RETRY else "0",
                "1" if trimmed else "0",
                delivery.consumer,
            ],
            settles=True,
        )
        self._retry_state.pop(sub, None)
        return bool(settled)

    async def dead_letter(
        self, sub: Subscription, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        settled = await self._group_script(
            sub,
            "DEAD_LETTER",
            keys=[self._origin_key(sub, delivery.origin), self.dlq_key(sub)],
            args=[
                sub.group,
                delivery.id,
                record,
                "1" if delivery.origin == _RETRY else "0",
                "1" if trimmed else "0",
                delivery.consumer,
            ],
            settles=True,
        )
        # A group that is gone (None) took everything it held with it: nothing was settled.
        return bool(settled)

    async def extend(
        self, sub: Subscription, consumer: str, deliveries: Sequence[Delivery]
    ) -> Renewal:
        lost: list[Delivery] = []
        trimmed: list[Delivery] = []
        for origin in (_STREAM, _RETRY):
            mine = {d.id: d for d in deliveries if (d.origin == _RETRY) == (origin == _RETRY)}
            if not mine:
                continue
            found = await self._group_script(
                sub,
                "EXTEND",
                keys=[self._origin_key(sub, origin)],
                args=[sub.group, consumer, *mine],
            )
            if found is None:
                # The bus lost its data: nobody else holds these deliveries, and the bus has
                # nothing to deliver again, so the worker's copies are all there is.
                return Renewal(trimmed=tuple(deliveries))
            lost_ids, trimmed_ids = found
            lost += (mine[_decode(i)] for i in lost_ids)
            trimmed += (mine[_decode(i)] for i in trimmed_ids)
        if trimmed:
            _log.error(
                "entries were trimmed from the stream while their handlers ran; their outcome "
                "is settled from the worker's copy, but raise maxlen above the backlog",
                topic=sub.topic,
                agent=sub.group,
                count=len(trimmed),
            )
        return Renewal(tuple(lost), tuple(trimmed))

    async def reclaim(
        self,
        sub: Subscription,
        consumer: str,
        min_idle: float,
        count: int,
        *,
        hold_back: int | None = None,
    ) -> Reclaimed:
        found = await self._group_script(
            sub,
            "RECLAIM",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, consumer, max(0, int(min_idle * 1000)), count, hold_back or 0],
        )
        if found is None:
            return Reclaimed()
        claimed, lost, held = found
        if lost:
            _log.error(
                "pending entries were trimmed from the stream before they were handled; "
                "raise maxlen above the backlog",
                topic=sub.topic,
                agent=sub.group,
                count=int(lost),
            )
        found = Reclaimed(self._pending_delivery(entry, consumer) for entry in claimed)
        found.held_back = int(held)
        return found

    async def recover(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        held = await self._group_script(
            sub,
            "RECOVER",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, consumer, count],
        )
        return [self._pending_delivery(entry, consumer) for entry in held or ()]

    @staticmethod
    def _pending_delivery(entry: Any, consumer: str) -> Delivery:
        which, entry_id, flat, attempt = entry
        data = _field(flat, b"e")
        origin = _STREAM if int(which) == 1 else _RETRY
        return Delivery(_decode(entry_id), data, int(attempt), origin, consumer)
