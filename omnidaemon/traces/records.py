"""What a worker writes to a run's trace: one record per attempt of an agent at an event.

A record is written when the attempt starts and again when it ends (the end replaces the
start, under the same field), but both ride on the agent's batched acks (`TraceBook` is
their buffer): an attempt that ends before its start record went out writes once. A record
names the event (id, topic, causation, creation time, publishing app), the attempt (agent,
number, worker, start and end times), its outcome and error, the events it published, and
the OpenTelemetry ids of its span when tracing is on, so the two traces can be matched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from omnidaemon.brokers.traces import TraceWrite
from omnidaemon.envelope import Envelope, dumps

__all__ = ["Outcome", "TraceBook", "attempt_field", "decode_record"]

Outcome = Literal["running", "succeeded", "retrying", "dead_lettered", "rejected", "cancelled"]
"""What became of one attempt: still `running` (or its worker died: a later attempt exists),
`succeeded`, failed and `retrying`, failed for good (`dead_lettered`), refused by its handler
(`rejected`: it raised `Reject`, and was dead-lettered), or `cancelled` (`App.cancel`)."""


def attempt_field(event_id: str, agent: str, attempt: int) -> str:
    """The field an attempt's record is stored under in its run."""
    return f"{event_id}|{agent}|{attempt}"


def decode_record(data: bytes) -> dict[str, Any] | None:
    """A stored record as JSON data, or `None` when it is not one (never evaluated)."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


@dataclass(slots=True)
class _Attempt:
    run: str
    fields: dict[str, Any]


@dataclass(slots=True)
class TraceBook:
    """The trace records of one agent in one worker that wait for its next ack.

    Args:
        agent: The agent's name.
        worker: The worker's consumer name, recorded with each attempt.
        ttl: Seconds a run's trace is kept after its last write; 0 turns tracing off.
        max_records: The most records one run keeps.
    """

    agent: str
    worker: str
    ttl: float
    max_records: int
    _waiting: dict[str, _Attempt] = field(default_factory=dict)
    _pointers: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether records are kept at all (`OMNIDAEMON_TRACE_TTL` above 0)."""
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._waiting)

    def started(self, envelope: Envelope[Any], attempt: int, at: float) -> None:
        """Record that an attempt began at `at` (Unix seconds)."""
        self._put(envelope, attempt, at, None, "running", None, ())

    def ended(
        self,
        envelope: Envelope[Any],
        attempt: int,
        outcome: Outcome,
        *,
        started: float | None = None,
        error: dict[str, str] | None = None,
        published: Sequence[tuple[str, str]] = (),
        otel: tuple[str, str] | None = None,
    ) -> None:
        """Record how an attempt ended (now), replacing its start record if that is still
        waiting here; `started` defaults to the start recorded, else now."""
        now = time.time()
        field_name = attempt_field(envelope.id, self.agent, attempt)
        waiting = self._waiting.get(field_name)
        if started is None:
            started = waiting.fields["started"] if waiting is not None else now
        self._put(envelope, attempt, started, now, outcome, error, published, otel)

    def take(self) -> TraceWrite | None:
        """Everything waiting, as one write (`None` when nothing is); `restore` it if the
        write fails."""
        if not self._waiting and not self._pointers:
            return None
        records: dict[str, dict[str, bytes]] = {}
        for name, attempt in self._waiting.items():
            records.setdefault(attempt.run, {})[name] = dumps(attempt.fields)
        write = TraceWrite(records, self._pointers, self.ttl, self.max_records, time.time())
        self._waiting = {}
        self._pointers = {}
        return write

    def restore(self, write: TraceWrite) -> None:
        """Put back a write that failed, under what was recorded since (which is newer)."""
        for run, fields in write.records.items():
            for name, data in fields.items():
                if name not in self._waiting:
                    decoded = decode_record(data)
                    if decoded is not None:
                        self._waiting[name] = _Attempt(run, decoded)
        for event_id, run in write.pointers.items():
            self._pointers.setdefault(event_id, run)

    def _put(
        self,
        envelope: Envelope[Any],
        attempt: int,
        started: float,
        ended: float | None,
        outcome: Outcome,
        error: dict[str, str] | None,
        published: Sequence[tuple[str, str]],
        otel: tuple[str, str] | None = None,
    ) -> None:
        run = envelope.correlation_id or envelope.id
        fields: dict[str, Any] = {
            "event": envelope.id,
            "topic": envelope.topic,
            "causation": envelope.causation_id,
            "created": envelope.created_at.timestamp(),
            "source": envelope.source,
            "agent": self.agent,
            "attempt": attempt,
            "worker": self.worker,
            "started": started,
            "ended": ended,
            "outcome": outcome,
        }
        if error is not None:
            fields["error"] = error
        if published:
            fields["published"] = [list(item) for item in published]
        if otel is not None:
            fields["otel_trace_id"], fields["otel_span_id"] = otel
        self._waiting[attempt_field(envelope.id, self.agent, attempt)] = _Attempt(run, fields)
        if envelope.id != run:
            self._pointers[envelope.id] = run
