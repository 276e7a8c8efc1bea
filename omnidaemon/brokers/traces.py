"""The trace store: what a bus keeps of each run so that `omnidaemon trace` can show it whole.

A run is every event that shares one correlation id. Workers write one *record* per attempt
of an agent at an event (opaque bytes to the bus, see `omnidaemon.traces`), under a field
that names the attempt: a later record of the same attempt (its end after its start)
replaces the earlier one. The records ride on `Broker.ack` (`TraceWrite`), in the round trip
that settles the deliveries, never in one of their own per event.

A bus keeps, per run, its records for at least `ttl` seconds after their write (the memory
bus renews the whole run on each write; Redis keeps each record up to a sixteenth of `ttl`
longer; NATS expires each record `ttl` after its own write), at most `max_records` distinct
fields (past that, new fields are counted as dropped, not stored; a bus may check the bound
only beyond the first few records each writer files under a run, as Redis does past 32, or
per writing process, as NATS does);
per event that is not its run's first, which run it belongs to (so any event id finds its
run); and an index of runs by their last write, for listing recent runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "RECORD_VERSION",
    "AttemptRow",
    "Attempts",
    "StoredTrace",
    "TraceNotWritten",
    "TraceStore",
    "TraceWrite",
    "encode_attempt",
]

RECORD_VERSION = 1
"""The version of the attempt record's format, its first item (see `encode_attempt`)."""

AttemptRow = tuple[Any, ...]
"""One attempt's values as a worker collects them, before any encoding: `(run, event, topic,
causation, created, source, attempt, started, ended, outcome, error, published, otel)`, where
`created` is the event's creation (a datetime, or Unix seconds: a success's row has the
latter), `otel` is `(trace id, span id)` or `None` and `ended` is `None` for a start record."""


def encode_attempt(agent: str, worker: str, row: Sequence[Any]) -> tuple[str, str, bytes]:
    """An attempt's row as `(run, field, record)`: the record one JSON array, its first item
    `RECORD_VERSION` (see `omnidaemon.traces.records.decode_record`)."""
    run, event, topic, causation, created, source, attempt, started, ended = row[:9]
    outcome, error, published, otel = row[9:13]
    trace_id, span_id = otel if otel else (None, None)
    record = orjson.dumps(
        (
            RECORD_VERSION,
            event,
            topic,
            causation,
            created,
            source,
            agent,
            attempt,
            worker,
            started,
            ended,
            outcome,
            error,
            published,
            trace_id,
            span_id,
        )
    )
    return run, f"{event}|{agent}|{attempt}", record


@dataclass(frozen=True, slots=True)
class Attempts:
    """One agent's attempt records in one write, as values (`AttemptRow`), not yet encoded:
    a bus may encode them in one call for the whole batch (Redis), or each with
    `encode_attempt`.

    Attributes:
        agent: The agent that made every attempt.
        worker: The worker (consumer name) that ran them.
        rows: The attempts' values, in the order recorded.
        replacing: Per run, how many of its rows are the end of an attempt whose start
            record was written before (they replace it, so the per-run bound never drops them).
    """

    agent: str
    worker: str
    rows: Sequence[AttemptRow]
    replacing: dict[str, int] = field(default_factory=dict)

    def encoded(self) -> list[tuple[str, str, bytes]]:
        """Every row as `(run, field, record)`, in order."""
        agent, worker = self.agent, self.worker
        return [encode_attempt(agent, worker, row) for row in self.rows]


class TraceNotWritten(Exception):
    """`Broker.ack` settled its deliveries and wrote its counts, but not its trace records
    (the cause is chained): the caller keeps the records to write again, and must not send
    the counts a second time."""


@dataclass(frozen=True, slots=True)
class TraceWrite:
    """Trace records to store with an acknowledgement (`Broker.ack(..., trace=)`).

    Attributes:
        records: `(run id, field, record)`, stored in this order: a field's record replaces
            the one stored under it, so a later one of the same field wins. A record is UTF-8
            (a worker's are JSON), otherwise opaque to the bus.
        pointers: `(event id, run id)` for events that are not their run's first (whose id is
            not the run id).
        ttl: Seconds the run's records, its pointers and its place in the index are kept
            after this write.
        max_records: The most fields a run keeps; a new field past it is dropped and counted.
        now: The writer's wall-clock time (Unix seconds): the runs' place in the index.
        attempts: A worker's attempt records as values (stored after `records`).
    """

    records: Sequence[tuple[str, str, bytes]]
    pointers: Sequence[tuple[str, str]]
    ttl: float
    max_records: int
    now: float
    attempts: Attempts | None = None

    def __bool__(self) -> bool:
        return bool(self.records or self.pointers or (self.attempts and self.attempts.rows))

    def encoded(self) -> list[tuple[str, str, bytes]]:
        """Every record as `(run id, field, record)`: `records`, then the attempts encoded."""
        if self.attempts is None:
            return list(self.records)
        return [*self.records, *self.attempts.encoded()]

    def by_run(self) -> dict[str, dict[str, bytes]]:
        """The records grouped by run, the last of each field kept."""
        runs: dict[str, dict[str, bytes]] = {}
        for run, name, record in self.encoded():
            runs.setdefault(run, {})[name] = record
        return runs


@dataclass(frozen=True, slots=True)
class StoredTrace:
    """What a bus holds of one run.

    Attributes:
        records: The run's records by field.
        dropped: How many records the per-run bound refused.
    """

    records: dict[str, bytes]
    dropped: int = 0


class TraceStore(ABC):
    """The trace part of the broker contract (`Broker` inherits it); written by `ack`."""

    @abstractmethod
    async def read_trace(self, run_id: str) -> StoredTrace | None:
        """The records stored for the run `run_id`, or `None` when it has none (never
        written, or expired)."""

    @abstractmethod
    async def run_of(self, event_id: str) -> str | None:
        """The run an event belongs to, when a record of it was written (its run's id is
        the event's own id when it started the run, which this does not check)."""

    @abstractmethod
    async def recent_runs(self, *, since: float, limit: int) -> list[tuple[str, float]]:
        """Up to `limit` runs written to at or after `since` (Unix seconds), as `(run id,
        time of its last write)`, the most recently written first."""
