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


class _Attempt:
    """One attempt's record as it waits in the buffer: kept as the values it is made of,
    encoded only when sent (a start replaced by its end before then is never encoded)."""

    __slots__ = ("attempt", "ended", "envelope", "error", "otel", "outcome", "published", "started")

    def __init__(
        self,
        envelope: Envelope[Any],
        attempt: int,
        started: float,
        ended: float | None = None,
        outcome: Outcome = "running",
        error: dict[str, str] | None = None,
        published: Sequence[tuple[str, str]] = (),
        otel: tuple[str, str] | None = None,
    ) -> None:
        self.envelope = envelope
        self.attempt = attempt
        self.started = started
        self.ended = ended
        self.outcome = outcome
        self.error = error
        self.published = published
        self.otel = otel

    def fields(self, agent: str, worker: str) -> dict[str, Any]:
        envelope = self.envelope
        fields: dict[str, Any] = {
            "event": envelope.id,
            "topic": envelope.topic,
            "causation": envelope.causation_id,
            "created": envelope.created_at.timestamp(),
            "source": envelope.source,
            "agent": agent,
            "attempt": self.attempt,
            "worker": worker,
            "started": self.started,
            "ended": self.ended,
            "outcome": self.outcome,
        }
        if self.error is not None:
            fields["error"] = self.error
        if self.published:
            fields["published"] = [list(item) for item in self.published]
        if self.otel is not None:
            fields["otel_trace_id"], fields["otel_span_id"] = self.otel
        return fields


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
    # Records and pointers of a write that failed, encoded, to go with the next one.
    _failed: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # field -> (run, record)
    _failed_pointers: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """Whether records are kept at all (`OMNIDAEMON_TRACE_TTL` above 0)."""
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._waiting) + len(self._failed)

    def started(self, envelope: Envelope[Any], attempt: int, at: float) -> None:
        """Record that an attempt began at `at` (Unix seconds)."""
        self._waiting[attempt_field(envelope.id, self.agent, attempt)] = _Attempt(
            envelope, attempt, at
        )

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
        name = attempt_field(envelope.id, self.agent, attempt)
        if started is None:
            waiting = self._waiting.get(name)
            started = waiting.started if waiting is not None else now
        self._waiting[name] = _Attempt(
            envelope, attempt, started, now, outcome, error, published, otel
        )

    def take(self) -> TraceWrite | None:
        """Everything waiting, as one write (`None` when nothing is); `restore` it if the
        write fails."""
        if not self._waiting and not self._failed:
            return None
        records: dict[str, dict[str, bytes]] = {}
        pointers = self._failed_pointers
        for name, (run, data) in self._failed.items():
            records.setdefault(run, {})[name] = data
        agent, worker = self.agent, self.worker
        for name, waiting in self._waiting.items():
            envelope = waiting.envelope
            run = envelope.correlation_id or envelope.id
            records.setdefault(run, {})[name] = dumps(waiting.fields(agent, worker))
            if envelope.id != run:
                pointers[envelope.id] = run
        self._waiting = {}
        self._failed = {}
        self._failed_pointers = {}
        return TraceWrite(records, pointers, self.ttl, self.max_records, time.time())

    def restore(self, write: TraceWrite) -> None:
        """Put back a write that failed, under what was recorded since (which is newer)."""
        for run, fields in write.records.items():
            for name, data in fields.items():
                if name not in self._waiting and name not in self._failed:
                    self._failed[name] = (run, data)
        for event_id, run in write.pointers.items():
            self._failed_pointers.setdefault(event_id, run)
