"""Values, results, metrics, redelivery marks and the consumer registry on NATS.

Everything but the metric sums lives in the value stream (`p_kv`): one message per subject, so
a subject's last message is its value, and a per-message TTL (`Nats-TTL`, whole seconds) has
the server drop it on time, with no process of ours left to clean up. Every conditional write
is a publish with `Nats-Expected-Last-Subject-Sequence` (0: "the subject holds nothing"): the
stream checks it as it stores, so of writers racing on one subject exactly one wins, on one
server or a cluster. Deleting a value is a tombstone (an empty message with `_DELETED`, kept a
second) written through that same path, not a purge beside it, so a compare-and-set after a
delete or after an expiry sees an ordinary last sequence; reads take a tombstone for nothing.

Metric sums go to a counter stream (`p_m`, `Nats-Incr`): the server adds each increment as it
stores it, so every worker's batch is one publish per field with no read first and no
conflict. Extremes (`...:min_us`, `...:max_us`) cannot be added, so they are kept in the value
stream by compare-and-set, retried until the stored value needs no change.

Listings (results of an event, a group's consumers, values by prefix, every metric) read the
messages of a wildcard with batched direct gets, page after page from the last sequence seen:
each subject holds one message, so these are exactly the subjects' values.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Mapping, Sequence
from functools import partial
from typing import Any

import anyio
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.nats._core import (
    REQUEST_TIMEOUT,
    JetStreamError,
    msg_seq,
    server_time,
    unavailable,
)
from omnidaemon.brokers.nats._names import decode, key_from_tokens, key_subject_tokens
from omnidaemon.brokers.nats._streams import NatsParts
from omnidaemon.metrics import is_extreme

__all__ = ["NatsValues"]

_DELETED = "Omni-Deleted"  # header of a tombstone: the value was deleted
_TOMBSTONE = {_DELETED: "1", "Nats-TTL": "1s"}  # only a write's anchor; absence after expiry
# A compare-and-set lost: "wrong last sequence" (10071); in a cluster also 10164, when another
# write of the subject is still being replicated (not readable yet: read again until it is).
_WRONG_LAST = frozenset({10071, 10164})
_MARK_TTL = 86_400  # a redelivery mark outlives any lease; then the server drops it
_RETRY_FIRST, _RETRY_MAX = 0.02, 1.0  # seconds between tries of a write nobody took
_PAGE = 1000  # messages per direct-get batch of a listing


def _ttl(seconds: float) -> dict[str, str]:
    """A per-message TTL header: the server takes whole seconds, at least one (it truncates
    fractions and refuses less than a second), so round up: kept at least as long as asked."""
    return {"Nats-TTL": f"{max(1, math.ceil(seconds))}s"}


def _subject(msg: Msg) -> str:
    """The subject a message was stored on (a direct get's reply comes on our inbox)."""
    return (msg.headers or {})["Nats-Subject"]


def _int(data: bytes, field: str | None = None) -> int | None:
    """`data` as an integer, or its JSON object's `field` as one (`{"val": "12"}`)."""
    try:
        return int(data if field is None else json.loads(data)[field])
    except (ValueError, KeyError, TypeError):  # written by hand or by something else
        return None


async def _together(calls: Sequence[Awaitable[Any]]) -> None:
    """Await `calls` concurrently until all are done, then raise the first failure as itself
    (callers catch bus errors by type; an `ExceptionGroup` would slip past them)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


class NatsValues(NatsParts):
    """Results, keys and values, metrics, redelivery marks and the consumer registry."""

    # Writing -------------------------------------------------------------------------------

    async def _put(
        self, subject: str, data: bytes, headers: dict[str, str], *, metrics: bool = False
    ) -> dict[str, Any]:
        """Publish to the value (or counter) stream, making it first if need be."""
        ensure = self._ensure_metrics if metrics else self._ensure_kv
        deadline = anyio.current_time() + self._publish_timeout
        wait = 0.0
        while True:
            stream = await ensure()
            try:
                return await self._publish(subject, data, headers)
            except NoRespondersError:
                # Nobody took it, so it can be sent again: the bus lost the stream (made again
                # above), or on a cluster the stream has no leader yet (just made by another
                # process, or failing over), which takes tens of milliseconds.
                self._streams.discard(stream)
            if anyio.current_time() + wait > deadline:
                raise unavailable(self._url, ConnectionError(f"no stream takes {subject}"))
            await anyio.sleep(wait)
            wait = min(max(2 * wait, _RETRY_FIRST), _RETRY_MAX)

    async def _cas(self, subject: str, data: bytes, headers: dict[str, str], last: int) -> bool:
        """Write only if the subject's last message is sequence `last` (0: none); whether it
        did."""
        expect = {**headers, "Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            await self._put(subject, data, expect)
        except JetStreamError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
            return False
        return True

    async def _last(self, subject: str) -> Msg | None:
        return await self._direct_get_last(self._names.kv_stream, subject)

    async def _keep(
        self, subject: str, value: int, *, smaller: bool, headers: dict[str, str], read: bool
    ) -> None:
        """Store `value` unless the subject holds one at least as large (as small, with
        `smaller`). Without `read`, first try as if the subject held nothing: one round trip
        for the usual case (a new redelivery mark)."""
        last = await self._last(subject) if read else None
        while True:
            held = _int(last.data) if last is not None else None
            if held is not None and (held <= value if smaller else held >= value):
                return
            seq = msg_seq(last) if last is not None else 0
            if await self._cas(subject, str(value).encode(), headers, seq):
                return
            last = await self._last(subject)  # someone else wrote in between: look again

    # Listing -------------------------------------------------------------------------------

    async def _scan(self, stream: str, subjects: str) -> list[Msg]:
        """Every message on `subjects` (a wildcard) in `stream`, in sequence order: batched
        direct gets, each page starting after the last sequence the previous one returned."""
        client = await self._nc()
        page: list[Msg] = []
        ends: asyncio.Queue[Msg] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            # A batch is its messages, then one status message (204 EOB, or 404 for nothing,
            # or 503 for no stream): messages of one connection arrive in order.
            if (msg.headers or {}).get("Status"):
                ends.put_nowait(msg)
            else:
                page.append(msg)

        inbox = client.new_inbox()
        sub = await client.subscribe(inbox, cb=take)
        found: list[Msg] = []
        after = 0
        try:
            while True:
                request = {"seq": after + 1, "next_by_subj": subjects, "batch": _PAGE}
                await client.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
                )
                with anyio.fail_after(REQUEST_TIMEOUT):
                    end = await ends.get()
                found += page
                if page:
                    after = msg_seq(page[-1])
                page.clear()
                headers = end.headers or {}
                status = headers["Status"]
                if status in ("404", "503"):  # nothing (more) to read, or no such stream
                    return found
                if status != "204":
                    raise JetStreamError(int(status), 0, str(headers.get("Description", "")))
                # The page stopped at its size (or the server's byte limit): read on.
                if int(headers.get("Nats-Num-Pending", 0)) == 0:
                    return found
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled scan leaves no subscription
                await sub.unsubscribe()

    # Results -------------------------------------------------------------------------------

    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        # One subject per agent, each with its own TTL: a later agent's result does not
        # extend an earlier one's (on Redis the event's hash expires as one).
        await self._put(self._names.result(event_id, agent), record, _ttl(ttl))

    async def get_results(self, event_id: str) -> dict[str, bytes]:
        found = await self._scan(self._names.kv_stream, self._names.results(event_id))
        return {decode(_subject(msg).rpartition(".")[2]): msg.data for msg in found}

    # Keys and values ----------------------------------------------------------------------

    async def _value(self, subject: str) -> tuple[int, bytes | None]:
        """The subject's last sequence (0: none) and its value (`None`: absent or deleted)."""
        msg = await self._last(subject)
        if msg is None:
            return 0, None
        return msg_seq(msg), None if (msg.headers or {}).get(_DELETED) else msg.data

    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        subject = self._names.value(key)
        if not only_if_absent:
            await self._put(subject, value, _ttl(ttl))
            return True
        last = 0  # first as if nothing was ever stored: one round trip for a fresh claim
        while True:
            if await self._cas(subject, value, _ttl(ttl), last):
                return True
            last, held = await self._value(subject)
            if held is not None:
                return False
            # A tombstone, or what was there just expired: write over exactly that.

    async def get_value(self, key: str) -> bytes | None:
        _, held = await self._value(self._names.value(key))
        return held

    async def delete_value(self, key: str) -> None:
        await self._put(self._names.value(key), b"", _TOMBSTONE)

    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        subject = self._names.value(key)
        data, headers = (value, _ttl(ttl)) if value is not None else (b"", _TOMBSTONE)
        while True:
            last, held = await self._value(subject)
            if held != expected:
                return False
            if await self._cas(subject, data, headers, last):
                return True
            # Written in between: it may hold `expected` again (written twice), so read again.

    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        names = self._names
        # The subject tokens of the prefix's complete `:` parts narrow the scan; the last,
        # partial part (subject wildcards match whole tokens only) is filtered below.
        whole, colon, _ = prefix.rpartition(":")
        subjects = f"{names.value_root}{key_subject_tokens(whole)}.>" if colon else None
        found = await self._scan(names.kv_stream, subjects or f"{names.value_root}>")
        values = {}
        for msg in found:
            key = key_from_tokens(_subject(msg)[len(names.value_root) :])
            if key.startswith(prefix) and not (msg.headers or {}).get(_DELETED):
                values[key] = msg.data
        return values

    # Metrics -------------------------------------------------------------------------------

    async def _add_stats(self, sub: Subscription, stats: Mapping[str, int]) -> None:
        names = self._names
        calls: list[Awaitable[Any]] = []
        for field, value in stats.items():
            if is_extreme(field):
                subject = names.extreme(sub.topic, sub.group, field)
                smaller = field.endswith(":min_us")
                calls.append(self._keep(subject, value, smaller=smaller, headers={}, read=True))
            else:
                subject = names.metric(sub.topic, sub.group, field)
                calls.append(self._put(subject, b"", {"Nats-Incr": f"{value:+d}"}, metrics=True))
        await _together(calls)

    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        names = self._names
        sums, extremes = await asyncio.gather(
            self._scan(names.metrics_stream, names.metrics_all),
            self._scan(names.kv_stream, names.extremes_all),
        )
        found: dict[tuple[str, str], dict[str, int]] = {}
        for messages, head, inside in (
            (sums, f"{names.prefix}.m.", "val"),  # a counter's message: {"val": "<total>"}
            (extremes, f"{names.prefix}.kv.e.", None),
        ):
            for msg in messages:
                tokens = _subject(msg)[len(head) :].split(".")
                value = _int(msg.data, inside)
                if len(tokens) == 3 and value is not None:
                    topic, group, field = (decode(token) for token in tokens)
                    found.setdefault((topic, group), {})[field] = value
        return found

    # Redelivery marks ----------------------------------------------------------------------

    async def _write_marks(self, sub: Subscription, marks: list[tuple[int, int]]) -> None:
        keep = partial(self._keep, smaller=False, headers=_ttl(_MARK_TTL), read=False)
        mark = partial(self._names.mark, sub.topic, sub.group)
        await _together([keep(mark(seq), count) for seq, count in marks])

    async def _read_mark(self, sub: Subscription, seq: int) -> int | None:
        msg = await self._last(self._names.mark(sub.topic, sub.group, seq))
        return _int(msg.data) if msg is not None else None

    async def _read_free(self, sub: Subscription, seq: int) -> int:
        msg = await self._last(self._names.free(sub.topic, sub.group, seq))
        return (_int(msg.data) or 0) if msg is not None else 0

    async def _write_free(self, sub: Subscription, seq: int, count: int) -> None:
        # Written by the consumer holding the entry only: no compare-and-set needed.
        subject = self._names.free(sub.topic, sub.group, seq)
        await self._put(subject, str(count).encode(), _ttl(_MARK_TTL))

    # The consumer registry -----------------------------------------------------------------

    async def _register(self, sub: Subscription, consumer: str, pending: int) -> None:
        subject = self._names.registry(sub.topic, sub.group, consumer)
        await self._put(subject, json.dumps({"pending": pending}).encode(), {})

    async def _registered(self, sub: Subscription) -> dict[str, tuple[int, float]]:
        stream = self._names.kv_stream
        try:
            # The server's clock, as for the entries' time stamps: idle times that do not
            # depend on how far this machine's clock is off.
            info, found = await asyncio.gather(
                self._api(f"STREAM.INFO.{stream}"),
                self._scan(stream, self._names.registry_of(sub.topic, sub.group)),
            )
        except JetStreamError as exc:
            if exc.not_found:
                return {}
            raise
        now = server_time(info["ts"])
        consumers = {}
        for msg in found:
            stamp = server_time((msg.headers or {})["Nats-Time-Stamp"])
            pending = _int(msg.data, "pending") or 0
            consumers[decode(_subject(msg).rpartition(".")[2])] = (pending, max(0.0, now - stamp))
        return consumers

    async def _unregister(self, sub: Subscription, consumer: str) -> None:
        subject = self._names.registry(sub.topic, sub.group, consumer)
        try:
            await self._api(f"STREAM.PURGE.{self._names.kv_stream}", {"filter": subject})
        except JetStreamError as exc:
            if not exc.not_found:  # no value stream: nothing registered
                raise
