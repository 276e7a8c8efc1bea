"""The trace store: what a bus keeps of each run so that `omnidaemon trace` can show it whole.

A run is every event that shares one correlation id. Workers write one *record* per attempt
of an agent at an event (opaque bytes to the bus, see `omnidaemon.traces`), under a field
that names the attempt: a later record of the same attempt (its end after its start)
replaces the earlier one. The records ride on `Broker.ack` (`TraceWrite`), in the round trip
that settles the deliveries, never in one of their own per event.

A bus keeps, per run, its records for `ttl` seconds after the run's last write, at most
`max_records` distinct fields (past that, new fields are counted as dropped, not stored; a
bus may check the bound only beyond the first few records each process writes to a run, as
Redis does past 32, or per writing process, as NATS does);
per event that is not its run's first, which run it belongs to (so any event id finds its
run); and an index of runs by their last write, for listing recent runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StoredTrace", "TraceNotWritten", "TraceStore", "TraceWrite"]


class TraceNotWritten(Exception):
    """`Broker.ack` settled its deliveries and wrote its counts, but not its trace records
    (the cause is chained): the caller keeps the records to write again, and must not send
    the counts a second time."""


@dataclass(frozen=True, slots=True)
class TraceWrite:
    """Trace records to store with an acknowledgement (`Broker.ack(..., trace=)`).

    Attributes:
        records: `(run id, field, record)`, stored in this order: a field's record replaces
            the one stored under it, so a later one of the same field wins.
        pointers: `(event id, run id)` for events that are not their run's first (whose id is
            not the run id).
        ttl: Seconds the run's records, its pointers and its place in the index are kept
            after this write.
        max_records: The most fields a run keeps; a new field past it is dropped and counted.
        now: The writer's wall-clock time (Unix seconds): the runs' place in the index.
    """

    records: Sequence[tuple[str, str, bytes]]
    pointers: Sequence[tuple[str, str]]
    ttl: float
    max_records: int
    now: float

    def __bool__(self) -> bool:
        return bool(self.records or self.pointers)

    def by_run(self) -> dict[str, dict[str, bytes]]:
        """The records grouped by run, the last of each field kept."""
        runs: dict[str, dict[str, bytes]] = {}
        for run, name, record in self.records:
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
