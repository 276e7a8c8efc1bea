"""Stored results: what became of an event, readable by its id (`App.result`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from omnidaemon.envelope import dumps

__all__ = ["FINAL_STATUSES", "Result", "ResultStatus"]

ResultStatus = Literal["pending", "running", "retrying", "succeeded", "dead_lettered"]
"""Where an event is: not started yet, being handled, waiting for a retry, or finished."""

FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "dead_lettered"})


class Result(BaseModel):
    """The stored outcome of one event for one agent (`@app.agent(..., store_results=True)`).

    Attributes:
        event_id: The event.
        agent: The agent that handled it.
        status: `pending` (nothing stored yet), `running`, `retrying`, `succeeded` or
            `dead_lettered`.
        result: The handler's return value as JSON data (when `succeeded`).
        error: `{"type": ..., "message": ...}` of the last failure (when `retrying` or
            `dead_lettered`).
        attempts: The attempt the status belongs to.
        started_at: When that attempt started.
        finished_at: When the event finished (succeeded or dead-lettered).
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
        """True once the status can no longer change: `succeeded` or `dead_lettered`."""
        return self.status in FINAL_STATUSES

    def encode(self) -> bytes:
        """The record as JSON bytes, as brokers store it."""
        return dumps(self.model_dump())

    @classmethod
    def decode(cls, data: bytes) -> Result:
        """Read a record written by `encode`."""
        return cls.model_validate_json(data)
