"""How `omnidaemon trace` draws a run: a Rich tree of its events, each agent's handling of
them with every attempt, and the events each handling published; coloured on a terminal,
the same tree in plain text when piped."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from omnidaemon.cli._output import age, plural

if TYPE_CHECKING:
    from rich.console import Group
    from rich.text import Text
    from rich.tree import Tree

    from omnidaemon.traces import Trace
    from omnidaemon.traces.tree import AttemptTrace, EventTrace, HandlingTrace

__all__ = ["STATUS_STYLES", "short_id", "trace_view"]

# What each status looks like: green went well, red failed for good, yellow is not over yet,
# dim stopped without an outcome of its own.
STATUS_STYLES = {
    "succeeded": "green",
    "failed": "bold red",
    "dead_lettered": "bold red",
    "rejected": "bold red",
    "retrying": "yellow",
    "running": "yellow",
    "abandoned": "dim",
    "cancelled": "dim",
}
_ERROR_CHARS = 160  # of an error message on one attempt's line


def short_id(event_id: str) -> str:
    """An event id cut to its last 8 characters (`…b4eecb52`): the ids of one run share their
    start (UUIDv7s begin with their time), not their end."""
    return event_id if len(event_id) <= 12 else "…" + event_id[-8:]


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _error(error: dict[str, str] | None) -> str:
    if not error:
        return ""
    message = (error.get("message") or "").strip().splitlines()
    text = f"{error.get('type', 'Error')}: {message[0] if message else ''}".rstrip(": ")
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _header(trace: Trace) -> Text:
    from rich.text import Text

    line = Text.assemble(("run ", "bold"), (trace.run_id, "bold"), "  ")
    line.append(trace.status, style=STATUS_STYLES.get(trace.status, ""))
    if trace.duration is not None:
        line.append(f" in {age(trace.duration)}")
    line.append(
        f"  {plural(trace.event_count, 'event')}, {plural(trace.attempt_count, 'attempt')}"
        f"  started {_when(trace.started_at)}"
    )
    if trace.dropped:
        line.append(
            f"  {plural(trace.dropped, 'record')} dropped (OMNIDAEMON_TRACE_MAX_RECORDS)",
            style="yellow",
        )
    return line


def _attempt(attempt: AttemptTrace, now: datetime) -> Text:
    from rich.text import Text

    line = Text(f"attempt {attempt.attempt}  ")
    line.append(attempt.outcome, style=STATUS_STYLES.get(attempt.outcome, ""))
    if attempt.duration is not None:
        line.append(f"  {age(attempt.duration)}")
    elif attempt.outcome == "running" and attempt.started_at is not None:
        line.append(f"  for {age(max(0.0, (now - attempt.started_at).total_seconds()))}")
    if attempt.worker:
        line.append(f"  on {attempt.worker}", style="dim")
    if attempt.outcome == "abandoned" and attempt.worker is None:
        line.append("  (no record: its worker stopped before writing one)", style="dim")
    error = _error(attempt.error)
    if error:
        failed = attempt.outcome in ("dead_lettered", "rejected")
        line.append(f"  {error}", style="red" if failed else "yellow")
    return line


def _event_label(event: EventTrace, full_ids: bool, root: bool) -> Text:
    from rich.text import Text

    line = Text()
    line.append(event.topic or "(topic unknown)", style="bold cyan")
    line.append(f"  {event.id if full_ids else short_id(event.id)}", style="dim")
    if root and event.source:
        line.append(f"  from {event.source}")
    elif event.published_by is None and event.causation_id is not None:
        line.append(f"  caused by {short_id(event.causation_id)}", style="dim")
    if not event.handlings:
        line.append("  no handling recorded", style="dim")
    return line


def _handling_label(handling: HandlingTrace) -> Text:
    from rich.text import Text

    line = Text()
    line.append(handling.agent, style="bold")
    line.append("  ")
    line.append(handling.status, style=STATUS_STYLES.get(handling.status, ""))
    if len(handling.attempts) > 1:
        line.append(f"  after {plural(len(handling.attempts), 'attempt')}")
    return line


def _add_event(
    parent: Tree, event: EventTrace, full_ids: bool, now: datetime, root: bool = False
) -> None:
    node = parent.add(_event_label(event, full_ids, root))
    agents = {h.agent for h in event.handlings}
    for handling in event.handlings:
        branch = node.add(_handling_label(handling))
        for attempt in handling.attempts:
            branch.add(_attempt(attempt, now))
        for child in event.children:
            if child.published_by == handling.agent:
                _add_event(branch, child, full_ids, now)
    for child in event.children:
        if child.published_by not in agents:  # its publisher left no record on this event
            _add_event(node, child, full_ids, now)


def _failures(trace: Trace, full_ids: bool) -> list[Text]:
    from rich.text import Text

    lines = []
    for failure in trace.failures:
        event_id = str(failure.get("event_id") or "")
        where = f"{failure.get('topic')} {event_id if full_ids else short_id(event_id)}"
        line = Text("failed: ", style="bold red")
        line.append(f"{failure.get('agent')} on {where}")
        error = _error(failure.get("error"))
        if error:
            line.append(f": {error}")
        lines.append(line)
    return lines


def trace_view(trace: Trace, *, full_ids: bool = False, now: datetime | None = None) -> Group:
    """What `omnidaemon trace` prints for `trace`: a header line with the run's id, status,
    duration and size, the tree, and one line per handling that failed for good."""
    from rich.console import Group
    from rich.tree import Tree

    now = now or datetime.now(UTC)
    tree = Tree(_header(trace), guide_style="dim")
    for event in trace.events:
        _add_event(tree, event, full_ids, now, root=True)
    return Group(tree, *_failures(trace, full_ids))
