"""The trace store on the in-memory bus (`Broker.ack(..., trace=)` and its readers).

Expiry is on the bus's clock (so `advance` moves it on, as it does values); the index of
runs is ordered by the writers' wall-clock times, as on every bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omnidaemon.brokers.traces import StoredTrace, TraceWrite

__all__ = ["TraceRecords"]


@dataclass(slots=True)
class _Run:
    records: dict[str, bytes] = field(default_factory=dict)
    dropped: int = 0
    expires_at: float = 0.0
    written_at: float = 0.0  # the last writer's wall-clock time


class TraceRecords:
    """Every run's trace records on one bus. The caller passes the bus's clock (`now`)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._pointers: dict[str, tuple[float, str]] = {}  # event id -> (expires at, run)
        self._sweep_at = 1024  # runs and pointers held when the expired ones are next dropped

    def write(self, write: TraceWrite, now: float) -> None:
        """Store a `TraceWrite`."""
        if len(self._runs) + len(self._pointers) >= self._sweep_at:
            self._runs = {k: r for k, r in self._runs.items() if r.expires_at > now}
            self._pointers = {k: p for k, p in self._pointers.items() if p[0] > now}
            self._sweep_at = max(1024, 2 * (len(self._runs) + len(self._pointers)))
        for run_id, fields in write.by_run().items():
            run = self._live(run_id, now)
            if run is None:
                run = self._runs[run_id] = _Run()
            for name, record in fields.items():
                if name in run.records or len(run.records) < write.max_records:
                    run.records[name] = record
                else:
                    run.dropped += 1
            run.expires_at = now + write.ttl
            run.written_at = write.now
        for event_id, run_id in write.pointers:
            self._pointers[event_id] = (now + write.ttl, run_id)

    def read(self, run_id: str, now: float) -> StoredTrace | None:
        """The run's records, if it has any."""
        run = self._live(run_id, now)
        if run is None:
            return None
        return StoredTrace(dict(run.records), run.dropped)

    def run_of(self, event_id: str, now: float) -> str | None:
        """The run an event belongs to, if recorded."""
        found = self._pointers.get(event_id)
        return found[1] if found is not None and found[0] > now else None

    def recent(self, since: float, limit: int, now: float) -> list[tuple[str, float]]:
        """Runs last written at or after `since`, the latest first."""
        found = [
            (run_id, run.written_at)
            for run_id, run in self._runs.items()
            if run.expires_at > now and run.written_at >= since
        ]
        found.sort(key=lambda item: item[1], reverse=True)
        return found[: max(0, limit)]

    def _live(self, run_id: str, now: float) -> _Run | None:
        run = self._runs.get(run_id)
        if run is not None and run.expires_at <= now:
            del self._runs[run_id]
            return None
        return run
