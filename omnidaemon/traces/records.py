"""What a worker writes to a run's trace: one record per attempt of an agent at an event.

A record names the event (id, topic, causation, creation time, publishing app), the attempt
(agent, number, worker, start and end times), its outcome and error, the events it published,
and the OpenTelemetry ids of its span when tracing is on, so the two traces can be matched.

Records ride on the agent's batched acks (`TraceBook` is their buffer), and the hot path pays
for one record per attempt, written when the attempt ends: nothing at its start. An attempt
still running `START_AFTER` seconds after it began also gets a start record (outcome
`running`), found among the worker's running deliveries when a batch is sent and decoded from
the delivery then (rare, so the common case pays nothing): what `omnidaemon trace --follow`
shows of a long handler, and what is left of an attempt whose worker is killed. Its end
replaces it (same field).

A record is a JSON array, its first item the format's version: half the bytes of an object
with named fields (`omnidaemon.brokers.traces.encode_attempt`). The book keeps an attempt's
values as they are (`AttemptRow`) and encodes nothing on the hot path: a bus encodes a whole
batch at once (Redis: one `orjson` call a batch), or each record (the others).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import TypeAdapter, ValidationError

from omnidaemon.brokers.base import Delivery
from omnidaemon.brokers.traces import RECORD_VERSION, AttemptRow, Attempts, TraceWrite
from omnidaemon.envelope import Envelope

__all__ = ["START_AFTER", "Outcome", "TraceBook", "attempt_field", "decode_record"]

Outcome = Literal["running", "succeeded", "retrying", "dead_lettered", "rejected", "cancelled"]
"""What became of one attempt: still `running` (or its worker died: a later attempt exists),
`succeeded`, failed and `retrying`, failed for good (`dead_lettered`), refused by its handler
(`rejected`: it raised `Reject`, and was dead-lettered), or `cancelled` (`App.cancel`)."""

START_AFTER = 0.5
"""Seconds an attempt runs before its start is recorded (a faster one writes its end only)."""

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])
# What a success's record takes from its event (its creation comes as Unix seconds, which
# the worker has computed already), read by one C call from the model's `__dict__`.
_EVENT_FIELDS = operator.itemgetter("id", "correlation_id", "topic", "causation_id", "source")
_FORGET_PAST = 256  # entries of attempts that are over, kept until they are all dropped
_FIELDS = (
    "event",
    "topic",
    "causation",
    "created",
    "source",
    "agent",
    "attempt",
    "worker",
    "started",
    "ended",
    "outcome",
    "error",
    "published",
    "otel_trace_id",
    "otel_span_id",
)


def attempt_field(event_id: str, agent: str, attempt: int) -> str:
    """The field an attempt's record is stored under in its run."""
    return f"{event_id}|{agent}|{attempt}"


def decode_record(data: bytes) -> dict[str, Any] | None:
    """A stored record as a dict of its named fields, or `None` when it is not one of a
    version this release reads (never evaluated)."""
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, list) or not record or record[0] != RECORD_VERSION:
        return None
    return dict(zip(_FIELDS, record[1:], strict=False))


@dataclass(slots=True)
class TraceBook:
    """The trace records of one agent in one worker that wait for its next ack.

    Args:
        agent: The agent's name.
        worker: The worker's consumer name, recorded with each attempt.
        ttl: Seconds a record is kept after its write; 0 turns tracing off.
        max_records: The most records one run keeps.
        running: The worker's deliveries under way with when each began (wall clock),
            where start records are found.
    """

    agent: str
    worker: str
    ttl: float
    max_records: int
    running: Mapping[tuple[str, str], tuple[Delivery, float]] = field(default_factory=dict)
    # Attempts under way whose start record is written or whose end is recorded (no start
    # record may follow: it would replace the end), by when each began (which tells a later
    # attempt of the same delivery key from this one); with entries of attempts that are
    # over, until `_forget_settled` drops them.
    _started: dict[tuple[str, str], float] = field(default_factory=dict)
    # Attempts whose start record went out, by when each began: their end replaces it.
    _start_written: dict[tuple[str, str], float] = field(default_factory=dict)
    _rows: list[AttemptRow] = field(default_factory=list)
    _replacing: dict[str, int] = field(default_factory=dict)  # run -> rows ending a start
    _pointers: list[tuple[str, str]] = field(default_factory=list)  # (event id, run)

    @property
    def enabled(self) -> bool:
        """Whether records are kept at all (`OMNIDAEMON_TRACE_TTL` above 0)."""
        return self.ttl > 0

    def __len__(self) -> int:
        """How many records wait to be sent."""
        return len(self._rows)

    def ended(
        self,
        delivery: tuple[str, str],
        envelope: Envelope[Any],
        attempt: int,
        outcome: Outcome,
        started: float | None = None,
        error: dict[str, str] | None = None,
        published: Sequence[tuple[str, str]] = (),
        otel: tuple[str, str] | None = None,
    ) -> None:
        """Record how an attempt ended (now); it began at `started` (default: now). Its
        delivery is still among the running ones (until its settle is over): no start record
        may follow this end."""
        now = time.time()
        if started is None:
            started = now
        else:
            if self._start_written:
                self._replaces_start(delivery, envelope, started)
            # Still among the running deliveries until its settle is over: a batch sent
            # meanwhile must not add its start record after (so over) this end.
            self._started[delivery] = started
        self._append(envelope, attempt, started, now, outcome, error, published or None, otel)

    def succeeded(
        self,
        delivery: tuple[str, str],
        envelope: Envelope[Any],
        attempt: int,
        started: float,
        ended: float,
        created: float,
        published: Sequence[tuple[str, str]],
        otel: tuple[str, str] | None,
    ) -> None:
        """Record an attempt that succeeded, begun at `started` and ended at `ended`, its
        delivery already out of the running ones (so no start record can follow); `created`
        is the event's creation in Unix seconds (what the record stores; readers take it as
        they take the text of a datetime).

        Every event that succeeds comes here, so it is written for that path: no default or
        keyword argument to bind, the row appended here (not by `_append`: the drain measured
        the call), and the event's fields read by one C call from the model's `__dict__`
        (pydantic's attributes are slower one by one). The values are kept as they are and
        encoded with the whole batch by the bus (see `take`)."""
        if self._start_written:  # checked here: the call is for the rare long attempt
            self._replaces_start(delivery, envelope, started)
        event_id, correlation, topic, causation, source = _EVENT_FIELDS(envelope.__dict__)
        run = correlation or event_id
        self._rows.append(
            (
                run,
                event_id,
                topic,
                causation,
                created,
                source,
                attempt,
                started,
                ended,
                "succeeded",
                None,
                published or None,
                otel,
            )
        )
        if event_id != run:
            self._pointers.append((event_id, run))

    def _replaces_start(
        self, delivery: tuple[str, str], envelope: Envelope[Any], started: float
    ) -> None:
        """Count the end of an attempt whose start record went out: it replaces that record."""
        if self._start_written.pop(delivery, None) == started:
            run = envelope.correlation_id or envelope.id
            self._replacing[run] = self._replacing.get(run, 0) + 1

    def _append(
        self,
        envelope: Envelope[Any],
        attempt: int,
        started: float,
        ended: float | None,
        outcome: Outcome,
        error: dict[str, str] | None,
        published: Sequence[tuple[str, str]] | None,
        otel: tuple[str, str] | None,
    ) -> None:
        event_id = envelope.id
        run = envelope.correlation_id or event_id
        self._rows.append(
            (
                run,
                event_id,
                envelope.topic,
                envelope.causation_id,
                envelope.created_at,
                envelope.source,
                attempt,
                started,
                ended,
                outcome,
                error,
                published,
                otel,
            )
        )
        if event_id != run:
            self._pointers.append((event_id, run))

    def start_due(self) -> float | None:
        """When the next start record falls due (Unix seconds), if any attempt has none."""
        # `running` holds attempts in the order they began (a worker adds each as it starts,
        # removes it when it ends): the first without a record is the earliest. Asked with
        # every batch, so it stops there rather than looking at every attempt under way.
        started = self._started
        for key, (_, at) in self.running.items():
            if started.get(key) != at:
                return at + START_AFTER
        return None

    def take(self) -> TraceWrite | None:
        """Everything waiting, with the start records that fell due, as one write (`None`
        when there is nothing); `restore` it if the write fails."""
        now = time.time()
        if self.running:
            self._add_starts(now)
        elif self._started:
            self._started.clear()
            self._start_written.clear()
        if not self._rows:
            return None
        attempts = Attempts(self.agent, self.worker, self._rows, self._replacing)
        write = TraceWrite((), self._pointers, self.ttl, self.max_records, now, attempts)
        self._rows = []
        self._replacing = {}
        self._pointers = []
        return write

    def restore(self, write: TraceWrite) -> None:
        """Put back a write that failed, before what was recorded since (which is newer and
        so must be stored after it)."""
        if write.attempts is not None:
            self._rows[:0] = write.attempts.rows
            for run, count in write.attempts.replacing.items():
                self._replacing[run] = self._replacing.get(run, 0) + count
        self._pointers[:0] = write.pointers

    def _forget_settled(self) -> None:
        """Drop what is kept of attempts no longer under way (settled, or lost): all at once,
        when they are many, so that an attempt's end costs one entry and no pass of its own
        (an entry of an attempt that is over is never read: `running` no longer holds it)."""
        running = self.running
        if len(self._started) > len(running) + _FORGET_PAST:
            self._started = {
                key: at
                for key, at in self._started.items()
                if (under_way := running.get(key)) is not None and under_way[1] == at
            }
            started = self._started
            self._start_written = {
                key: at for key, at in self._start_written.items() if started.get(key) == at
            }

    def _add_starts(self, now: float) -> None:
        self._forget_settled()
        due = self.start_due()
        if due is None or due > now:
            return
        started = self._started
        for key, (delivery, at) in list(self.running.items()):
            if started.get(key) == at or at + START_AFTER > now:
                continue
            started[key] = at
            try:
                envelope = _ANY_ENVELOPE.validate_json(delivery.data)
            except ValidationError:
                continue  # it will be dead-lettered as unreadable: no run to record it in
            self._start_written[key] = at
            self._append(envelope, delivery.attempt, at, None, "running", None, None, None)
