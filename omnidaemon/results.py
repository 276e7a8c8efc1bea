"""Stored results: what became of an event, readable by its id (`App.result`)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict

from omnidaemon.envelope import dumps

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker

__all__ = ["FINAL_STATUSES", "Result", "ResultStatus", "event_results", "wait_result"]

ResultStatus = Literal["pending", "running", "retrying", "succeeded", "dead_lettered", "cancelled"]
"""Where an event is: not started yet, being handled, waiting for a retry, or finished
(succeeded, dead-lettered, or cancelled by `App.cancel`)."""

FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "dead_lettered", "cancelled"})


class Result(BaseModel):
    """The stored outcome of one event for one agent (`@app.agent(..., store_results=True)`).

    Attributes:
        event_id: The event.
        agent: The agent that handled it.
        status: `pending` (nothing stored yet), `running`, `retrying`, `succeeded`,
            `dead_lettered` or `cancelled`.
        result: The handler's return value as JSON data (when `succeeded`).
        error: `{"type": ..., "message": ...}` of the last failure (when `retrying` or
            `dead_lettered`); `{"type": "Cancelled", "message": <the reason>}` when
            `cancelled`.
        attempts: The attempt the status belongs to.
        started_at: When that attempt started.
        finished_at: When the event finished (succeeded, dead-lettered or cancelled).
    """

    model_config = ConfigDict(frozen=True)

    event_id: str
    agent: str | None = None
    status: ResultStatus
    result: Any = None
    error: dict[str, str] | None = None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        """True once the status can no longer change: `succeeded`, `dead_lettered` or
        `cancelled`."""
        return self.status in FINAL_STATUSES

    def encode(self) -> bytes:
        """The record as JSON bytes, as brokers store it."""
        return dumps(self.model_dump())

    @classmethod
    def decode(cls, data: bytes) -> Result:
        """Read a record written by `encode`."""
        return cls.model_validate_json(data)


async def wait_result(
    broker: Broker, event_id: str, agent: str | None, timeout: float | None
) -> Result:
    """`App.result` on a connected broker: the event's current result, or with `timeout`
    the first final one, polled with a backoff of up to 0.5 s."""
    deadline = None if timeout is None else anyio.current_time() + timeout
    delay = 0.01
    while True:
        current = await _current_result(broker, event_id, agent)
        if current.finished or deadline is None:
            return current
        if anyio.current_time() >= deadline:
            raise TimeoutError(
                f"event {event_id} did not finish within {timeout:g} s (status: {current.status})"
            )
        await anyio.sleep(min(delay, max(0.0, deadline - anyio.current_time())))
        delay = min(delay * 2, 0.5)


async def _current_result(broker: Broker, event_id: str, agent: str | None) -> Result:
    records = await broker.get_results(event_id)
    if agent is not None:
        record = records.get(agent)
    elif len(records) > 1:
        raise ValueError(
            f"agents {', '.join(sorted(records))} stored results for {event_id}: pass agent=..."
        )
    else:
        record = next(iter(records.values()), None)
    if record is None:
        return Result(event_id=event_id, agent=agent, status="pending")
    return Result.decode(record)


async def event_results(
    app: App, event_id: str, *, agent: str | None = None, timeout: float | None = None
) -> list[Result]:
    """Every stored result of an event, one per agent that stored one, sorted by agent
    (`omnidaemon result`, `GET /v1/events/{id}/result`).

    Args:
        event_id: The id `publish` returned.
        agent: Only this agent's result.
        timeout: Wait up to this many seconds for each result to be final (`succeeded` or
            `dead_lettered`), including agents that store one meanwhile; `None` answers at
            once.

    Returns:
        The results; one `pending` result (for `agent`, else without an agent) when nothing
        is stored for the event: not handled yet, unknown, or expired.

    Raises:
        TimeoutError: `timeout` passed before a result was final.
    """
    await app.connect()
    records = await app.broker.get_results(event_id)
    if timeout is not None:
        names: list[str | None] = [agent] if agent else [*sorted(records)] or [None]
        found = []
        for name in names:
            try:
                found.append(await app.result(event_id, agent=name, timeout=timeout))
            except ValueError:
                # Several agents stored results meanwhile: wait for each of them.
                others = sorted(await app.broker.get_results(event_id))
                found += [
                    await app.result(event_id, agent=other, timeout=timeout) for other in others
                ]
        return found
    if agent is not None:
        return [await app.result(event_id, agent=agent)]
    if not records:
        return [Result(event_id=event_id, agent=None, status="pending")]
    return [Result.decode(records[name]) for name in sorted(records)]
