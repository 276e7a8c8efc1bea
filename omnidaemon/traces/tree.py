"""A run's trace as a causal tree, built from the attempt records its workers wrote.

Each event of the run is a node: its topic, id and publisher, each agent's handling of it
with every attempt (worker, start, end, outcome, error), and the events its handling
published as child nodes. What the records leave out is inferred, and said so: an attempt
whose record still says `running` while a later attempt of the same agent exists, and an
attempt number no record names, were *abandoned* (their worker died or lost its lease before
it could write an end); an event a handling published that no agent has recorded yet is a
node without handlings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from omnidaemon.brokers.traces import StoredTrace
from omnidaemon.traces.records import decode_record

__all__ = ["AttemptTrace", "EventTrace", "HandlingTrace", "RunStatus", "Trace", "build_trace"]

AttemptOutcome = Literal[
    "running", "succeeded", "retrying", "dead_lettered", "rejected", "cancelled", "abandoned"
]
RunStatus = Literal["running", "succeeded", "failed", "cancelled"]
_OUTCOMES: frozenset[str] = frozenset(
    ("running", "succeeded", "retrying", "dead_lettered", "rejected", "cancelled")
)
_FAILED = ("dead_lettered", "rejected")
_UNFINISHED = ("running", "retrying", "abandoned")


class AttemptTrace(BaseModel):
    """One attempt of one agent at one event.

    Attributes:
        attempt: Its number, 1 for the first delivery.
        outcome: `running`, `succeeded`, `retrying` (failed; a retry follows),
            `dead_lettered`, `rejected` (the handler raised `Reject`), `cancelled`, or
            `abandoned` (its worker died or lost the delivery before recording an end).
        worker: The worker's consumer name (`None` when unknown).
        started_at: When it began (`None` when unknown).
        ended_at: When it ended (`None` while running, or when unknown).
        duration: Seconds from start to end.
        error: `{"type", "message"}` of its failure.
        published: Ids of the events it published (its return value and `ctx.publish`).
        otel_trace_id: The OpenTelemetry trace id of its span, when tracing was on.
        otel_span_id: The OpenTelemetry span id of its span.
    """

    model_config = ConfigDict(frozen=True)

    attempt: int
    outcome: AttemptOutcome
    worker: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration: float | None = None
    error: dict[str, str] | None = None
    published: list[str] = []
    otel_trace_id: str | None = None
    otel_span_id: str | None = None


class HandlingTrace(BaseModel):
    """One agent's handling of one event: its attempts, the last one's outcome its status."""

    model_config = ConfigDict(frozen=True)

    agent: str
    status: AttemptOutcome
    attempts: list[AttemptTrace]


class EventTrace(BaseModel):
    """One event of the run, with its handlings and the events they published.

    Attributes:
        id: The event's id.
        topic: Where it was published (`None` for an event known only by its id).
        causation_id: The event whose handling published it.
        created_at: When it was published.
        source: The app that published it.
        published_by: The agent whose handling published it (`None`: from outside).
        handlings: Each agent's handling of it; none yet for an event no agent has recorded.
        children: The events its handlings published, oldest first.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    topic: str | None = None
    causation_id: str | None = None
    created_at: datetime | None = None
    source: str | None = None
    published_by: str | None = None
    handlings: list[HandlingTrace] = []
    children: list[EventTrace] = []


class Trace(BaseModel):
    """A whole run: every event sharing one correlation id, as a causal tree.

    Attributes:
        run_id: The run's correlation id.
        status: `running` (a handling is under way, or waits for a retry), `failed` (some
            handling was dead-lettered or rejected), `cancelled`, or `succeeded`.
        started_at: When its first event was published.
        ended_at: When its last attempt ended (`None` while running).
        duration: Seconds from start to end (`None` while running).
        events: The run's first events (usually one), each with its subtree.
        event_count: How many events the tree holds.
        attempt_count: How many attempts it records.
        failures: `{"event_id", "topic", "agent", "error"}` of each handling that failed
            for good, in the order they ended.
        dropped: Records the per-run bound (`OMNIDAEMON_TRACE_MAX_RECORDS`) refused.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    status: RunStatus
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration: float | None = None
    events: list[EventTrace]
    event_count: int
    attempt_count: int
    failures: list[dict[str, Any]] = []
    dropped: int = 0


def _time(value: Any) -> datetime | None:
    """A record's time: Unix seconds, or RFC 3339 text (an event's creation)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
        # A publisher's time with no zone is UTC, as the worker takes it.
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return None


def _attempt(record: dict[str, Any], outcome: AttemptOutcome) -> AttemptTrace:
    started, ended = record.get("started"), record.get("ended")
    duration = (
        round(ended - started, 6)
        if isinstance(started, int | float) and isinstance(ended, int | float)
        else None
    )
    published = record.get("published") or []
    error = record.get("error")
    return AttemptTrace(
        attempt=int(record.get("attempt", 0)),
        outcome=outcome,
        worker=record.get("worker"),
        started_at=_time(started),
        ended_at=_time(ended),
        duration=duration,
        error={str(k): str(v) for k, v in error.items()} if isinstance(error, dict) else None,
        published=[str(item[1]) for item in published if isinstance(item, list) and len(item) == 2],
        otel_trace_id=record.get("otel_trace_id"),
        otel_span_id=record.get("otel_span_id"),
    )


def _handling(agent: str, records: dict[int, dict[str, Any]]) -> HandlingTrace:
    last = max(records)
    attempts = []
    for number in range(1, last + 1):
        record = records.get(number)
        if record is None:
            attempts.append(AttemptTrace(attempt=number, outcome="abandoned"))
            continue
        found = record.get("outcome")
        outcome: AttemptOutcome = found if found in _OUTCOMES else "running"
        if outcome == "running" and number < last:
            outcome = "abandoned"
        attempts.append(_attempt(record, outcome))
    return HandlingTrace(agent=agent, status=attempts[-1].outcome, attempts=attempts)


def build_trace(run_id: str, stored: StoredTrace) -> Trace:
    """The run's tree from what the bus stored of it (records that are not ours are
    skipped)."""
    info: dict[str, dict[str, Any]] = {}  # event id -> its fields from any record
    attempts: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}  # event -> agent -> n
    publisher: dict[str, tuple[str, str | None]] = {}  # child id -> (parent id, agent)
    topics: dict[str, str] = {}  # child id -> topic, for events known only as published
    for data in stored.records.values():
        record = decode_record(data)
        if record is None or not isinstance(record.get("event"), str):
            continue
        event_id, agent = record["event"], str(record.get("agent"))
        info.setdefault(event_id, record)
        attempts.setdefault(event_id, {}).setdefault(agent, {})[int(record.get("attempt", 0))] = (
            record
        )
        for item in record.get("published") or []:
            if isinstance(item, list) and len(item) == 2:
                publisher.setdefault(str(item[1]), (event_id, agent))
                topics.setdefault(str(item[1]), str(item[0]))
    ids = set(info) | set(publisher)
    children: dict[str | None, list[str]] = {}
    for event_id in ids:
        fields = info.get(event_id, {})
        parent = fields.get("causation") or publisher.get(event_id, (None, None))[0]
        children.setdefault(parent if parent in ids else None, []).append(event_id)

    def created(event_id: str) -> float:
        when = _time(info.get(event_id, {}).get("created"))
        return when.timestamp() if when is not None else float("inf")

    handlings: dict[str, list[HandlingTrace]] = {
        event_id: [_handling(agent, found) for agent, found in sorted(by_agent.items())]
        for event_id, by_agent in attempts.items()
    }

    def node(event_id: str, seen: frozenset[str]) -> EventTrace:
        fields = info.get(event_id, {})
        kids = sorted(children.get(event_id, []), key=lambda k: (created(k), k))
        return EventTrace(
            id=event_id,
            topic=fields.get("topic") or topics.get(event_id),
            causation_id=fields.get("causation") or publisher.get(event_id, (None, None))[0],
            created_at=_time(fields.get("created")),
            source=fields.get("source"),
            published_by=publisher.get(event_id, (None, None))[1],
            handlings=handlings.get(event_id, []),
            # A cycle cannot come from real causation ids; bad records must not loop forever.
            children=[node(k, seen | {k}) for k in kids if k not in seen],
        )

    roots = sorted(children.get(None, []), key=lambda k: (created(k), k))
    everything = [h for found in handlings.values() for h in found]
    all_attempts = [a for h in everything for a in h.attempts]
    failures: list[dict[str, Any]] = [
        {
            "event_id": event_id,
            "topic": info[event_id].get("topic"),
            "agent": h.agent,
            "error": h.attempts[-1].error,
            "ended_at": h.attempts[-1].ended_at,
        }
        for event_id, found in handlings.items()
        for h in found
        if h.status in _FAILED
    ]
    never = datetime.max.replace(tzinfo=UTC)
    failures.sort(key=lambda f: f["ended_at"] or never)
    status: RunStatus
    if any(h.status in _UNFINISHED for h in everything):
        status = "running"
    elif failures:
        status = "failed"
    elif any(h.status == "cancelled" for h in everything):
        status = "cancelled"
    else:
        status = "succeeded"
    starts = [created(e) for e in ids if created(e) != float("inf")]
    starts += [a.started_at.timestamp() for a in all_attempts if a.started_at is not None]
    ends = [a.ended_at.timestamp() for a in all_attempts if a.ended_at is not None]
    started_at = _time(min(starts)) if starts else None
    ended_at = _time(max(ends)) if ends and status != "running" else None
    duration = (
        round(ended_at.timestamp() - started_at.timestamp(), 6)
        if started_at is not None and ended_at is not None
        else None
    )
    return Trace(
        run_id=run_id,
        status=status,
        started_at=started_at,
        ended_at=ended_at,
        duration=duration,
        events=[node(r, frozenset({r})) for r in roots],
        event_count=len(ids),
        attempt_count=len(all_attempts),
        failures=failures,
        dropped=stored.dropped,
    )
