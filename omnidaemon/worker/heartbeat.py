"""Worker heartbeats: each worker says, every few seconds, that it lives and what it runs.

A heartbeat is a small JSON record stored on the bus under `worker:<consumer name>` with a time
to live of three intervals: a worker that stops beating (killed, frozen, cut off) disappears
from `omnidaemon health` and `bus stats` by itself, and one that stops gracefully removes its
record at once. `omnidaemon.fleet` reads them.

With each beat goes a companion record, `active:<consumer name>`, with the same time to live:
the deliveries the worker's handlers run now (`omnidaemon inspect`, `omnidaemon.activity`).
It is a key of its own so that the heartbeat, which `bus stats` and `health` read for every
worker, stays small; it lists at most `MAX_LISTED` deliveries (with the total), and a payload
only when its entry is at most `MAX_PAYLOAD_BYTES`, so a beat's size stays bounded.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from omnidaemon.observability.logging import get_logger

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker, Delivery
    from omnidaemon.worker.consumer import AgentConsumer

__all__ = [
    "ACTIVE_PREFIX",
    "HEARTBEAT_PREFIX",
    "MAX_LISTED",
    "MAX_PAYLOAD_BYTES",
    "Heartbeat",
    "worker_alive",
]

HEARTBEAT_PREFIX = "worker:"
"""The key prefix of heartbeat records among the bus's stored values."""

ACTIVE_PREFIX = "active:"
"""The key prefix of the records of what each worker runs now."""

MAX_LISTED = 100
"""The most deliveries one worker's record lists (the oldest first); `count` has them all."""

MAX_PAYLOAD_BYTES = 8 * 1024
"""A listed delivery carries its payload only when its entry is at most this many bytes."""

_log = get_logger("omnidaemon.worker")


async def worker_alive(broker: Broker, worker: str) -> bool:
    """Whether the worker named `worker` (its consumer name) still beats: its heartbeat is on
    the bus. A worker that died, or was silent for three intervals, is not alive."""
    return await broker.get_value(HEARTBEAT_PREFIX + worker) is not None


class Heartbeat:
    """Writes one worker's heartbeat until cancelled, and removes it on `clear()`.

    Args:
        broker: The bus to write to.
        worker: The worker's consumer name.
        app: The app's name.
        consumers: The worker's agent consumers (their metrics and capacity are reported).
        interval: Seconds between beats.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        worker: str,
        app: str,
        consumers: Sequence[AgentConsumer],
        interval: float,
    ) -> None:
        self._broker = broker
        self._key = HEARTBEAT_PREFIX + worker
        self._active_key = ACTIVE_PREFIX + worker
        self._worker = worker
        self._app = app
        self._consumers = consumers
        self.interval = interval
        self._started_at = datetime.now(UTC).isoformat()

    def record(self) -> bytes:
        """The heartbeat record as it is written now."""
        from omnidaemon import __version__

        agents: dict[str, dict[str, Any]] = {}
        for consumer in self._consumers:
            metrics = consumer.metrics
            counts = {
                "in_flight": metrics.in_flight,
                "received": metrics.received,
                "succeeded": metrics.succeeded,
                "failed": metrics.failed,
                "retried": metrics.retried,
                "dead_lettered": metrics.dead_lettered,
            }
            seen = agents.get(consumer.subscription.group)
            if seen is not None:
                # A debounced agent's other consumers (omnidaemon.debounce): one agent, its
                # own topic's, with the counts of all of them.
                for name, count in counts.items():
                    seen[name] += count
                continue
            agents[consumer.subscription.group] = {
                "topic": consumer.subscription.topic,
                "concurrency": consumer.capacity,
                **counts,
            }
        return orjson.dumps(
            {
                "id": self._worker,
                "app": self._app,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self._started_at,
                "beat_at": datetime.now(UTC).isoformat(),
                "interval": self.interval,
                "agents": agents,
            }
        )

    def active_record(self) -> bytes:
        """The record of the deliveries the worker's handlers run now, oldest first."""
        running = sorted(
            (
                (started, consumer.subscription, delivery)
                for consumer in self._consumers
                for delivery, started in consumer.running.values()
            ),
            key=lambda item: item[0],
        )
        listed = [
            _describe(delivery, sub.topic, sub.group, started)
            for started, sub, delivery in running[:MAX_LISTED]
        ]
        return orjson.dumps({"worker": self._worker, "count": len(running), "running": listed})

    async def beat(self) -> None:
        """Write one heartbeat and the record of what runs, both alive for three intervals."""
        ttl = self.interval * 3
        await self._broker.set_value(self._key, self.record(), ttl)
        await self._broker.set_value(self._active_key, self.active_record(), ttl)

    async def run(self) -> None:
        """Beat every `interval` seconds until cancelled; a failed beat is logged once per
        outage and tried again at the next interval."""
        failures = 0
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.beat()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1:
                    _log.warning(
                        "cannot write the worker's heartbeat", error=f"{type(exc).__name__}: {exc}"
                    )

    async def clear(self) -> None:
        """Remove the heartbeat (a graceful stop); failures are ignored, the TTL cleans up."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                await self._broker.delete_value(self._key)
                await self._broker.delete_value(self._active_key)
            except Exception as exc:
                _log.debug("could not remove the heartbeat", error=str(exc))


def _describe(delivery: Delivery, topic: str, agent: str, started: float) -> dict[str, Any]:
    """One running delivery as the active record lists it; the entry is read again here (a
    few per beat) rather than kept decoded by the consumer, which would cost every event."""
    entry: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        entry = orjson.loads(delivery.data)
    envelope = entry if isinstance(entry, dict) else {}
    described: dict[str, Any] = {
        "topic": topic,
        "agent": agent,
        "event_id": envelope.get("id"),
        "correlation_id": envelope.get("correlation_id"),
        "entry_id": delivery.id,
        "attempt": delivery.attempt,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "entry_bytes": len(delivery.data),
    }
    if len(delivery.data) <= MAX_PAYLOAD_BYTES and "payload" in envelope:
        described["payload"] = envelope["payload"]
    return described
