"""What every live worker runs now (`omnidaemon inspect`, `GET /v1/inspect`).

Each worker writes, with its heartbeat, the deliveries its handlers run (see
`omnidaemon.worker.heartbeat`): the record lives as long as the heartbeat, so a dead worker's
disappears with it. Reading needs only the bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.fleet import WorkerStatus, live_workers
from omnidaemon.worker.heartbeat import ACTIVE_PREFIX

__all__ = ["RunningEvent", "WorkerActivity", "fleet_activity"]


@dataclass(frozen=True, slots=True)
class RunningEvent:
    """One delivery a worker's handler runs now.

    Attributes:
        topic: Its topic.
        agent: The agent running it.
        event_id: The event's id (`None` for an entry that is not an envelope).
        correlation_id: The event's correlation id.
        entry_id: Its entry on the bus.
        attempt: Which attempt this is (1 for the first).
        started_at: When its handling began.
        entry_bytes: The size of its entry.
        payload: The payload, when the worker listed it (small entries only); else `None`.
        payload_listed: Whether `payload` is the payload (it may be JSON `null`).
    """

    topic: str
    agent: str
    event_id: str | None
    correlation_id: str | None
    entry_id: str
    attempt: int
    started_at: datetime
    entry_bytes: int
    payload: Any = None
    payload_listed: bool = False

    def to_json(self, *, payload: bool = False) -> dict[str, Any]:
        """The event as JSON data; with `payload`, its payload too (`null` if not listed)."""
        data: dict[str, Any] = {
            "topic": self.topic,
            "agent": self.agent,
            "event_id": self.event_id,
            "correlation_id": self.correlation_id,
            "entry_id": self.entry_id,
            "attempt": self.attempt,
            "started_at": self.started_at.isoformat(),
            "entry_bytes": self.entry_bytes,
        }
        if payload:
            data["payload"] = self.payload
            data["payload_listed"] = self.payload_listed
        return data


@dataclass(frozen=True, slots=True)
class WorkerActivity:
    """A live worker and the deliveries it runs now.

    Attributes:
        worker: The worker's heartbeat.
        count: How many deliveries it runs (`running` lists at most 100 of them).
        running: The deliveries it runs, the oldest first.
    """

    worker: WorkerStatus
    count: int
    running: tuple[RunningEvent, ...]

    def to_json(self, *, payload: bool = False) -> dict[str, Any]:
        """The worker's activity as JSON data (payloads with `payload`)."""
        return {
            "worker": self.worker.id,
            "app": self.worker.app,
            "host": self.worker.host,
            "pid": self.worker.pid,
            "count": self.count,
            "running": [r.to_json(payload=payload) for r in self.running],
        }


def _running(item: Any) -> RunningEvent:
    return RunningEvent(
        topic=str(item["topic"]),
        agent=str(item["agent"]),
        event_id=None if item.get("event_id") is None else str(item["event_id"]),
        correlation_id=None if item.get("correlation_id") is None else str(item["correlation_id"]),
        entry_id=str(item["entry_id"]),
        attempt=int(item["attempt"]),
        started_at=datetime.fromisoformat(item["started_at"]),
        entry_bytes=int(item.get("entry_bytes", 0)),
        payload=item.get("payload"),
        payload_listed="payload" in item,
    )


async def fleet_activity(
    broker: Broker, *, app: str | None = None, agent: str | None = None
) -> list[WorkerActivity]:
    """What each live worker runs now, workers sorted by host and pid.

    Args:
        app: Only the workers of this app.
        agent: Only this agent's deliveries (`count` counts the listed ones then).

    A worker whose record is missing (it has not beaten yet) or cannot be read (another
    version's) is shown running nothing.
    """
    workers = [w for w in await live_workers(broker) if app is None or w.app == app]
    records = await broker.scan_values(ACTIVE_PREFIX)
    found = []
    for worker in workers:
        count = 0
        running: tuple[RunningEvent, ...] = ()
        raw = records.get(ACTIVE_PREFIX + worker.id)
        if raw is not None:
            try:
                data = orjson.loads(raw)
                running = tuple(_running(item) for item in data["running"])
                count = int(data["count"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                count, running = 0, ()  # shown running nothing rather than failing all
        if agent is not None:
            running = tuple(r for r in running if r.agent == agent)
            count = len(running)
        found.append(WorkerActivity(worker, count, running))
    return found
