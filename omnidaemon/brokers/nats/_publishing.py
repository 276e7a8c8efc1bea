"""Publishing on NATS: one JetStream publish per entry, acknowledged by the stream (durable, on
a majority of its replicas, when the `PubAck` comes back).

A topic's stream is made by its first publish, as Redis makes a stream with its first `XADD`.
A delayed entry is a message schedule (nats-server >= 2.12): a message on the topic's delayed
subject whose `Nats-Schedule: @at <time>` header has the server publish it to the topic subject
at that time, durably (it survives restarts like any stored message).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import anyio
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, NoRespondersError

from omnidaemon.brokers.nats._core import JetStreamError, unavailable
from omnidaemon.brokers.nats._streams import NatsParts

__all__ = ["NatsPublishing", "schedule_headers"]

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

    async def _durably(
        self, topic: str, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """Publish until the stream acknowledges, making the stream when it is missing, and
        retrying a bus that does not answer for up to `publish_timeout` seconds."""
        deadline = anyio.current_time() + self._publish_timeout
        wait = _RETRY_EVERY
        while True:
            try:
                await self._ensure_topic(topic)
                # A try shorter than the whole timeout: a stream whose leader died answers
                # nothing until another is elected, and the next try reaches that one.
                left = deadline - anyio.current_time()
                await self._publish(subject, data, headers, timeout=max(0.5, min(_TRY, left)))
                return
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
            await anyio.sleep(wait)
            wait = min(wait * 2, _RETRY_MAX)
