"""Publishing on NATS: one JetStream publish per entry, acknowledged by the stream (durable, on
a majority of its replicas, when the `PubAck` comes back).

A topic's stream is made by its first publish, as Redis makes a stream with its first `XADD`.
A delayed entry is a message schedule (nats-server >= 2.12): a message on the topic's delayed
subject whose `Nats-Schedule: @at <time>` header has the server publish it to the topic subject
at that time, durably (it survives restarts like any stored message).

`publish_once` is JetStream's de-duplication: the entry's `Nats-Msg-Id` is made from the key,
and the stream stores one message per id within its duplicate window (`DUPLICATE_WINDOW`, two
minutes), whoever publishes it, at once or later. The window is the stream's, not the call's:
a shorter `window` holds the key for the stream's two minutes all the same; a longer one is
held for its remainder by a value (`once:<topic>:<key>`) written after the append, which a
publisher that dies between the two does not write.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from omnidaemon.brokers.nats._core import REQUEST_TIMEOUT, JetStreamError, unavailable
from omnidaemon.brokers.nats._names import encode
from omnidaemon.brokers.nats._streams import DUPLICATE_WINDOW, NatsParts

__all__ = ["ONCE_HEADER", "NatsPublishing", "schedule_headers"]

ONCE_HEADER = "Omni-Once"  # a publish_once entry's header: the token of the call that made it

_RETRY_EVERY = 0.25  # seconds between a failed publish's tries, doubling up to _RETRY_MAX
_RETRY_MAX = 2.0
_TRY = 2.0  # seconds one try of a publish waits for the stream's acknowledgement


def schedule_headers(delay: float, target: str) -> dict[str, str]:
    """Headers that have the server publish a message to `target` `delay` seconds from now.

    The time is this process's clock (the schedule header takes an absolute time), in
    milliseconds: the server fires it within a few milliseconds of it.
    """
    due = datetime.now(UTC) + timedelta(seconds=delay)
    stamp = due.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"Nats-Schedule": f"@at {stamp}", "Nats-Schedule-Target": target}


class NatsPublishing(NatsParts):
    """`publish`, `publish_many`, `publish_if_exists`."""

    async def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        if delay > 0:
            subject = self._names.delayed(topic, uuid.uuid4().hex)
            headers = schedule_headers(delay, self._names.entries(topic))
            await self._durably(topic, subject, data, headers)
        else:
            await self._durably(topic, self._names.entries(topic), data, None)

    async def publish_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        if not entries:
            return
        for topic in {topic for topic, _ in entries}:
            await self._ensure_topic(topic)
        # Every request is written to the connection in order before any reply is awaited:
        # one round trip for the lot, and each topic's entries keep their order (a connection's
        # messages reach the server in the order they were written).
        requests = [
            asyncio.ensure_future(self._publish(self._names.entries(topic), data))
            for topic, data in entries
        ]
        results = await asyncio.gather(*requests, return_exceptions=True)
        failed = [
            (topic, data)
            for (topic, data), result in zip(entries, results, strict=True)
            if isinstance(result, BaseException)
        ]
        # What failed is published again one by one, with the retries of `publish` (an
        # entry published twice is better than one lost: delivery is at least once anyway).
        for topic, data in failed:
            await self.publish(topic, data)

    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        subject = self._names.entries(topic)
        stream = self._names.stream(topic)
        try:
            # No stream takes the subject (deleted, or never made): nobody answers.
            await self._publish(subject, data, {"Nats-Expected-Stream": stream})
        except NoRespondersError:
            return False
        except JetStreamError as exc:
            if exc.err_code == 10060:  # expected stream does not match
                return False
            raise
        return True

    async def publish_once(self, topic: str, data: bytes, key: str, *, window: float) -> bool:
        mark = f"once:{topic}:{key}"
        held = window > DUPLICATE_WINDOW  # longer than the stream remembers ids: a mark too
        if held and await self.get_value(mark) is not None:
            return False
        # The id holds only subject-safe characters (`encode`), and no id our other publishes
        # use (`again:`, `dead:`, `omni-replay:`) starts with `once:`. The token tells this
        # call's entry from another's when a try whose acknowledgement was lost is repeated.
        token = uuid.uuid4().hex
        headers = {"Nats-Msg-Id": f"once:{encode(key)}", ONCE_HEADER: token}
        ack, retried = await self._durably(topic, self._names.entries(topic), data, headers)
        if ack.get("duplicate"):
            # The stream holds an entry of that id: another call's, or this one's from a try
            # whose acknowledgement never came (the duplicate's `seq` is the stored one's).
            return retried and await self._made_by(topic, int(ack.get("seq", 0)), token)
        if held:
            await self.set_value(mark, b"1", window)
        return True

    async def _made_by(self, topic: str, seq: int, token: str) -> bool:
        """Whether entry `seq` of the topic is the one a `publish_once` with `token` made
        (`False` when the stream no longer holds it: nothing tells)."""
        client = await self._nc()
        try:
            msg = await client.request(
                f"$JS.API.DIRECT.GET.{self._names.stream(topic)}",
                json.dumps({"seq": seq}).encode(),
                timeout=REQUEST_TIMEOUT,
            )
        except (NoRespondersError, NatsTimeout):
            return False
        return bool((msg.headers or {}).get(ONCE_HEADER) == token)

    async def _durably(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> tuple[dict[str, Any], bool]:
        """Publish until the stream acknowledges, making the stream when it is missing, and
        retrying a bus that does not answer for up to `publish_timeout` seconds. Returns the
        acknowledgement (the `PubAck`), and whether a try before the last failed (it may have
        stored the message all the same, its acknowledgement lost)."""
        deadline = anyio.current_time() + self._publish_timeout
        wait = _RETRY_EVERY
        retried = False
        while True:
            try:
                await self._ensure_topic(topic)
                # A try shorter than the whole timeout: a stream whose leader died answers
                # nothing until another is elected, and the next try reaches that one.
                left = deadline - anyio.current_time()
                timeout = max(0.5, min(_TRY, left))
                return await self._publish(subject, data, headers, timeout=timeout), retried
            except NoRespondersError:
                # The stream is gone (deleted, or the bus lost its data): make it again.
                self._forget(topic)
                error: BaseException = ConnectionError("no stream took the entry")
            except MaxPayloadError:
                raise
            except (ConnectionError, TimeoutError, OSError, NatsError) as exc:
                error = exc  # reconnecting (nats-py does it by itself), or no answer in time
            except JetStreamError as exc:
                if exc.code < 500 and exc.err_code not in (10008, 10076):
                    raise  # refused (bad config, too large): trying again cannot help
                error = exc  # no leader yet, JetStream not ready: a failover in progress
            if anyio.current_time() + wait > deadline:
                raise unavailable(self._url, error)
            retried = True
            await anyio.sleep(wait)
            wait = min(wait * 2, _RETRY_MAX)
