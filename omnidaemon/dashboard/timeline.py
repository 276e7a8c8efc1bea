"""A run's trace laid out as a timeline (`/ui/runs/{id}`): one row per event, per agent's
handling of it and per attempt, nested by causation, each with a bar placed on a common
time axis that starts when the run did.

Bars are in the units of an SVG `viewBox` `SCALE` wide (the template draws each row's bar in
an SVG stretched to its cell), so the page positions them with attributes, not styles (the
dashboard's Content Security Policy forbids inline styles).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from omnidaemon.traces import AttemptTrace, EventTrace, HandlingTrace, Trace

__all__ = ["MIN_WIDTH", "SCALE", "Bar", "Row", "Timeline", "find_event", "lay_out"]

SCALE = 1000.0
"""The width of the time axis, in the bars' units."""

MIN_WIDTH = 2.0
"""The narrowest bar drawn: an attempt of a millisecond still shows."""

RowKind = Literal["event", "handling", "attempt"]


@dataclass(frozen=True, slots=True)
class Bar:
    """Where a row's bar sits on the axis: `x` from the run's start and `width`, both in
    `SCALE` units; `open` when its end is not known yet (it runs until now)."""

    x: float
    width: float
    open: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the timeline.

    Attributes:
        kind: `event` (its bar marks when it was published), `handling` (an agent's
            handling of the event, from its first attempt's start to its last's end) or
            `attempt`.
        depth: How deep it is nested (the run's first events are at 0).
        event: The event the row is about (for a handling or an attempt: the handled one).
        status: An attempt's outcome, a handling's status; `None` for an event.
        offset: Seconds from the run's start to the row's start (`None` when unknown).
        duration: Seconds it lasted (`None` when unknown, or not over).
        bar: Its bar (`None` when its times are unknown).
        handling: The handling, for a handling or an attempt row.
        attempt: The attempt, for an attempt row.
    """

    kind: RowKind
    depth: int
    event: EventTrace
    status: str | None = None
    offset: float | None = None
    duration: float | None = None
    bar: Bar | None = None
    handling: HandlingTrace | None = None
    attempt: AttemptTrace | None = None


@dataclass(frozen=True, slots=True)
class Timeline:
    """A run's rows on one axis from `origin` (the run's start), `span` seconds long."""

    origin: datetime | None
    span: float
    rows: list[Row]


class _Axis:
    def __init__(self, origin: float, span: float, now: float) -> None:
        self.origin = origin
        self.span = span
        self.now = now

    def offset(self, moment: datetime | None) -> float | None:
        return None if moment is None else moment.timestamp() - self.origin

    def bar(self, start: float, end: float, *, open: bool = False) -> Bar:
        x = min(max(0.0, (start - self.origin) / self.span * SCALE), SCALE - MIN_WIDTH)
        width = max(MIN_WIDTH, min(SCALE - x, (end - start) / self.span * SCALE))
        return Bar(round(x, 2), round(width, 2), open)


def _moments(trace: Trace) -> Iterator[float]:
    """Every time the trace names."""

    def walk(event: EventTrace) -> Iterator[float]:
        if event.created_at is not None:
            yield event.created_at.timestamp()
        for handling in event.handlings:
            for attempt in handling.attempts:
                for moment in (attempt.started_at, attempt.ended_at):
                    if moment is not None:
                        yield moment.timestamp()
        for child in event.children:
            yield from walk(child)

    for root in trace.events:
        yield from walk(root)


def _attempt_end(attempt: AttemptTrace, after: AttemptTrace | None, now: float) -> float | None:
    """When an attempt's bar ends: its end; now while it runs; for one abandoned without an
    end, when the next attempt began (it was given up by then)."""
    if attempt.ended_at is not None:
        return attempt.ended_at.timestamp()
    if attempt.outcome == "running":
        return now
    if after is not None and after.started_at is not None:
        return after.started_at.timestamp()
    return None


def _handling_rows(
    event: EventTrace, handling: HandlingTrace, depth: int, axis: _Axis
) -> Iterator[Row]:
    attempts = handling.attempts
    spans: list[tuple[float, float | None]] = []
    rows = []
    for number, attempt in enumerate(attempts):
        after = attempts[number + 1] if number + 1 < len(attempts) else None
        start = attempt.started_at.timestamp() if attempt.started_at is not None else None
        end = _attempt_end(attempt, after, axis.now)
        bar = None
        if start is not None:
            spans.append((start, end))
            running = attempt.outcome == "running"
            bar = axis.bar(start, end if end is not None else start, open=running)
        duration = attempt.duration
        if duration is None and attempt.outcome == "running" and start is not None:
            duration = max(0.0, axis.now - start)
        rows.append(
            Row(
                "attempt",
                depth + 1,
                event,
                attempt.outcome,
                axis.offset(attempt.started_at),
                duration,
                bar,
                handling,
                attempt,
            )
        )
    head_bar = offset = duration = None
    if spans:
        start = min(s for s, _ in spans)
        ends = [e for _, e in spans if e is not None]
        end = max(ends) if ends else start
        head_bar = axis.bar(start, end, open=handling.status == "running")
        offset, duration = start - axis.origin, end - start
    yield Row("handling", depth, event, handling.status, offset, duration, head_bar, handling)
    yield from rows


def _event_rows(event: EventTrace, depth: int, axis: _Axis) -> Iterator[Row]:
    created = event.created_at.timestamp() if event.created_at is not None else None
    bar = axis.bar(created, created) if created is not None else None
    yield Row("event", depth, event, None, axis.offset(event.created_at), None, bar)
    agents = {h.agent for h in event.handlings}
    for handling in event.handlings:
        yield from _handling_rows(event, handling, depth + 1, axis)
        for child in event.children:
            if child.published_by == handling.agent:
                yield from _event_rows(child, depth + 2, axis)
    for child in event.children:
        if child.published_by not in agents:  # its publisher left no record on this event
            yield from _event_rows(child, depth + 1, axis)


def lay_out(trace: Trace, now: datetime) -> Timeline:
    """The rows of `trace` as read at `now` (where bars of running attempts end)."""
    moments = list(_moments(trace))
    if trace.started_at is not None:
        moments.append(trace.started_at.timestamp())
    if not moments:
        return Timeline(trace.started_at, 0.0, [])
    origin = min(moments)
    end = max(moments)
    if trace.status == "running":
        end = max(end, now.timestamp())
    span = max(end - origin, 0.001)
    axis = _Axis(origin, span, now.timestamp())
    rows = [row for root in trace.events for row in _event_rows(root, 0, axis)]
    return Timeline(datetime.fromtimestamp(origin, now.tzinfo), span, rows)


def find_event(trace: Trace, event_id: str) -> EventTrace | None:
    """The node of `event_id` in `trace`, if the trace holds it."""
    stack = list(trace.events)
    while stack:
        event = stack.pop()
        if event.id == event_id:
            return event
        stack.extend(event.children)
    return None
