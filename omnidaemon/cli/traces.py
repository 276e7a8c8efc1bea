"""`omnidaemon trace ID` and `omnidaemon runs`: a whole run as a tree of its events, agents and
attempts, and the recent runs with their status."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import (
    BrokerOption,
    CommandError,
    JsonOption,
    open_cli_broker,
    run_async,
)
from omnidaemon.cli._output import age, emit_json, is_terminal, print_table

if TYPE_CHECKING:
    from rich.console import Console

    from omnidaemon.app import App
    from omnidaemon.traces import RunSummary, Trace

__all__ = ["parse_duration", "print_run_hint", "run_of", "runs", "trace"]

FOLLOW_INTERVAL = 0.5  # seconds between two reads of a followed run
FOLLOW_APPEAR = 5.0  # seconds --follow waits for a run just published to be recorded
FOLLOW_SETTLE = 1.5  # seconds with nothing recorded after which a run not running is over
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """`30s`, `15m`, `1h`, `2d`, `1w`, a sum of them (`1h30m`), or bare seconds (`90`).

    Raises:
        ValueError: not a positive duration in that form.
    """
    value = text.strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif value and _PART.sub("", value) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    if seconds is None or seconds <= 0:
        raise ValueError(f"{text!r} is not a duration: write it as 30s, 15m, 1h, 2d or 1h30m")
    return timedelta(seconds=seconds)


class RunStatusChoice(StrEnum):
    """The statuses `runs --status` filters on."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def _console() -> Console:
    """Colours on a terminal; piped, plain text with no line cut or wrapped."""
    from rich.console import Console

    if is_terminal():
        return Console(highlight=False, markup=False)
    return Console(highlight=False, markup=False, no_color=True, width=100_000)


async def _wait_for_record(app: App, run_or_event_id: str, wait: float) -> Trace | None:
    """The run's trace, waiting up to `wait` seconds for a worker to record it."""
    import anyio

    deadline = time.monotonic() + wait
    while True:
        found = await app.trace(run_or_event_id)
        if found is not None or time.monotonic() >= deadline:
            return found
        await anyio.sleep(FOLLOW_INTERVAL)


def _unknown(run_or_event_id: str) -> CommandError:
    return CommandError(
        f"no trace of {run_or_event_id!r} on the bus (an unknown id, an event no worker has "
        "started yet, or a run whose trace expired: OMNIDAEMON_TRACE_TTL)"
    )


def _settled(trace: Trace, last_change: float) -> bool:
    """Whether a run is over: not running, and nothing recorded for `FOLLOW_SETTLE` seconds
    (an event a handling just published is recorded once an agent takes it up, a moment
    later: until then the tree cannot tell it from one no agent reads)."""
    if trace.status == "running":
        return False
    if time.monotonic() - last_change >= FOLLOW_SETTLE:
        return True
    ended = trace.ended_at
    return ended is not None and time.time() - ended.timestamp() >= FOLLOW_SETTLE


async def _follow(app: App, first: Trace, on_change: Callable[[Trace], None]) -> Trace:
    """Read the run every `FOLLOW_INTERVAL` seconds until it is over; call `on_change` with
    each new state; return the last one."""
    import anyio

    current, last_change = first, time.monotonic()
    while not _settled(current, last_change):
        await anyio.sleep(FOLLOW_INTERVAL)
        newer = await app.trace(current.run_id)
        if newer is None:  # expired, or deleted, while followed: show the last state
            break
        if newer != current:
            current, last_change = newer, time.monotonic()
            on_change(current)
    return current


async def _follow_live(app: App, first: Trace, full_ids: bool) -> Trace:
    """`_follow`, redrawing the tree on the terminal (Rich Live) at each read, for the
    durations of attempts still running."""
    from rich.live import Live

    from omnidaemon.cli._trace_view import trace_view

    with Live(trace_view(first, full_ids=full_ids), console=_console(), auto_refresh=False) as live:

        def redraw(current: Trace) -> None:
            live.update(trace_view(current, full_ids=full_ids), refresh=True)

        last = await _follow(app, first, redraw)
        redraw(last)
    return last


def trace(
    run_or_event_id: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="The run's correlation id, or the id of any event of the run."
        ),
    ],
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Redraw the run as it goes, until it is over (Ctrl-C stops); piped, print "
            "it once it is.",
        ),
    ] = False,
    full_ids: Annotated[
        bool, typer.Option("--full-ids", help="Show whole event ids in the tree.")
    ] = False,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """A whole run as a tree: each event (topic, id), each agent's handling of it with
    every attempt (outcome, duration, worker, error), and the events each handling
    published, nested under it.

    Exit status: 0 when the run is found (whatever its status: --json's `status` says it),
    1 when the bus holds no trace of ID.
    """

    live = is_terminal() and not json

    async def run() -> Trace:
        from omnidaemon.app import App

        async with App("cli", broker=open_cli_broker(broker)) as app:
            found = await _wait_for_record(app, run_or_event_id, FOLLOW_APPEAR if follow else 0)
            if found is None:
                raise _unknown(run_or_event_id)
            if follow and live:
                return await _follow_live(app, found, full_ids)
            if follow:  # piped: print the end only
                return await _follow(app, found, lambda _: None)
            return found

    found = run_async("trace", run)
    if json:
        emit_json(found.model_dump(mode="json"))
    elif not (follow and live):  # the live view left its last frame on screen
        from omnidaemon.cli._trace_view import trace_view

        _console().print(trace_view(found, full_ids=full_ids), soft_wrap=True)


def _run_row(summary: RunSummary, now: datetime) -> list[str]:
    failure = ""
    if summary.failed_agent is not None:
        error = summary.error or {}
        failure = (
            f"{summary.failed_agent}: {error.get('type', 'Error')}: {error.get('message', '')}"
        )
        failure = failure if len(failure) <= 100 else failure[:99] + "…"
    started = "-"
    if summary.started_at is not None:
        started = age(max(0.0, (now - summary.started_at).total_seconds())) + " ago"
    duration = age(summary.duration)
    if summary.status == "running" and summary.started_at is not None:
        duration = f"{age((now - summary.started_at).total_seconds())} so far"
    return [summary.run_id, summary.status, started, duration, str(summary.events), failure]


def runs(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            metavar="DURATION",
            help="How far back, by each run's last activity: 30s, 15m, 1h, 2d.",
        ),
    ] = "1h",
    status: Annotated[
        RunStatusChoice | None, typer.Option("--status", help="Only runs with this status.")
    ] = None,
    limit: Annotated[
        int, typer.Option("-n", "--limit", min=1, max=10_000, help="The most runs listed.")
    ] = 50,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """Recent runs, the most recently active first: status, start, duration, how many
    events, and the agent that failed with its error (`omnidaemon trace ID` shows one)."""
    try:
        span = parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None

    async def run() -> list[RunSummary]:
        from omnidaemon.app import App

        async with App("cli", broker=open_cli_broker(broker)) as app:
            return await app.runs(
                since=span, status=status.value if status is not None else None, limit=limit
            )

    found = run_async("runs", run)
    if json:
        emit_json([r.model_dump(mode="json") for r in found])
        return
    now = datetime.now(UTC)
    which = f"{status.value} runs" if status is not None else "runs"
    print_table(
        ["RUN ID", "STATUS", "STARTED", "DURATION", "EVENTS", "FAILURE"],
        [_run_row(r, now) for r in found],
        numeric=["STARTED", "DURATION", "EVENTS"],
        styles={"STATUS": _status_style},
        whole=["RUN ID", "STATUS"],
        empty=f"no {which} in the last {_span(span)}",
    )


def _status_style(value: str) -> str | None:
    from omnidaemon.cli._trace_view import STATUS_STYLES

    return STATUS_STYLES.get(value)


def _span(since: timedelta) -> str:
    seconds = since.total_seconds()
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return age(seconds)


async def run_of(app: App, event_id: str) -> tuple[str, str] | None:
    """The id and status of the run `event_id` belongs to, when the bus holds its trace."""
    found = await app.trace(event_id)
    return None if found is None else (found.run_id, found.status)


def print_run_hint(run_id: str, status: str) -> None:
    """`result`'s pointer, on standard error, from an event no agent stored a result for to
    the trace of its run."""
    print(
        f"omnidaemon result: no result stored for this event; its run {run_id} is {status}: "
        f"see omnidaemon trace {run_id}",
        file=sys.stderr,
    )
