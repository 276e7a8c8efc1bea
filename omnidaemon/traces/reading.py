"""Reading runs back: a run's trace by any of its ids (`App.trace`), and recent runs with
their status (`App.runs`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict

from omnidaemon.brokers.base import Broker
from omnidaemon.traces.tree import RunStatus, Trace, build_trace

__all__ = ["RunSummary", "find_trace", "list_runs"]

_READS_AT_ONCE = 16  # traces read concurrently when listing runs


class RunSummary(BaseModel):
    """One run as `omnidaemon runs` lists it.

    Attributes:
        run_id: The run's correlation id.
        status: As `Trace.status`.
        started_at: When its first event was published.
        duration: Seconds from start to its last attempt's end (`None` while running).
        events: How many events it holds.
        attempts: How many attempts its trace records.
        failed_agent: The first agent that failed for good, if any.
        error: That failure's `{"type", "message"}`.
        last_write: When a worker last wrote to its trace.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    status: RunStatus
    started_at: datetime | None
    duration: float | None
    events: int
    attempts: int = 0
    failed_agent: str | None = None
    error: dict[str, str] | None = None
    last_write: datetime


async def find_trace(broker: Broker, any_id: str) -> Trace | None:
    """The trace of the run `any_id` names: a run's correlation id, or the id of any event
    of the run that a worker recorded; `None` when the bus holds none (never recorded, or
    expired)."""
    stored = await broker.read_trace(any_id)
    run_id = any_id
    if stored is None:
        found = await broker.run_of(any_id)
        if found is None:
            return None
        run_id = found
        stored = await broker.read_trace(run_id)
        if stored is None:
            return None
    return build_trace(run_id, stored)


async def list_runs(
    broker: Broker,
    *,
    since: float,
    status: RunStatus | None = None,
    limit: int = 50,
) -> list[RunSummary]:
    """Runs written to since `since` (Unix seconds), the most recent first, with `status`
    only when given, at most `limit`."""
    # A status filter reads further back to fill the page: up to 20 times as many runs.
    candidates = await broker.recent_runs(
        since=since, limit=limit if status is None else 20 * limit
    )
    traces: dict[str, Trace | None] = {}
    limiter = anyio.CapacityLimiter(_READS_AT_ONCE)

    async def read(run_id: str) -> None:
        async with limiter:
            stored = await broker.read_trace(run_id)
        traces[run_id] = build_trace(run_id, stored) if stored is not None else None

    async with anyio.create_task_group() as tg:
        for run_id, _ in candidates:
            tg.start_soon(read, run_id)
    summaries = []
    for run_id, written in candidates:
        trace = traces.get(run_id)
        if trace is None or (status is not None and trace.status != status):
            continue
        summaries.append(_summary(trace, written))
        if len(summaries) >= limit:
            break
    return summaries


def _summary(trace: Trace, written: float) -> RunSummary:
    first: dict[str, Any] = trace.failures[0] if trace.failures else {}
    return RunSummary(
        run_id=trace.run_id,
        status=trace.status,
        started_at=trace.started_at,
        duration=trace.duration,
        events=trace.event_count,
        attempts=trace.attempt_count,
        failed_agent=first.get("agent"),
        error=first.get("error"),
        last_write=datetime.fromtimestamp(written, UTC),
    )
