"""`omnidaemon trace`, `omnidaemon runs` and `result`'s pointer to a trace, as a user sees
them: a real Redis, the app's worker running in a thread of the test process, and the
commands run in process (`tests/e2e/_in_process.py`)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from omnidaemon import App, Context
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.cli.traces import parse_duration
from omnidaemon.traces import Trace
from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import cli_env, wait_for
from tests.servers import running_redis

S = uuid.uuid4().hex[:8]
DOC, TEXT, AUDIT, SLOW = (f"{name}.{S}" for name in ("doc", "text", "audit", "slow"))


def make_app(url: str, release: threading.Event) -> App:
    """A two-stage pipeline whose first stage fails its first attempt at every event (and
    also publishes an audit event no agent reads), whose second stage fails for good when
    told to; and a slow agent that finishes when the test releases it."""
    app = App("tracer", broker=RedisBroker(url))

    @app.agent(DOC, name="extract", publishes=TEXT, max_retries=2, retry_backoff=0.01)
    async def extract(doc: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise RuntimeError("flaky storage")
        await ctx.publish(AUDIT, {"seen": doc["name"]})
        return doc

    @app.agent(TEXT, name="summarise", max_retries=0)
    async def summarise(doc: dict[str, Any]) -> None:
        if doc.get("fail"):
            raise RuntimeError(f"model refused {doc['name']}")

    @app.agent(SLOW, name="slow")
    async def slow(job: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(release.wait, 30.0)

    return app


@dataclass
class Bus:
    cwd: Path
    env: dict[str, str]
    release: threading.Event

    def cli(self, *args: str) -> Ran:
        return run_in_process(args, self.cwd, self.env)

    def publish(self, topic: str, data: dict[str, Any]) -> str:
        done = self.cli("publish", topic, orjson.dumps(data).decode())
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def trace(self, run_or_event_id: str) -> Trace | None:
        done = self.cli("trace", run_or_event_id, "--json")
        return Trace.model_validate_json(done.stdout) if done.returncode == 0 else None

    def finished(self, run_or_event_id: str, status: str) -> Trace:
        """The run's trace once it has ended with `status` and holds its 3 attempts (a run can
        look ended for a moment before its last event's handling is recorded)."""

        def ended() -> Trace | None:
            found = self.trace(run_or_event_id)
            done = found is not None and (found.status, found.attempt_count) == (status, 3)
            return found if done else None

        found: Trace = wait_for(ended, 20, f"run {run_or_event_id} to end", interval=0.05)
        return found


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    cwd = tmp_path_factory.mktemp("traces")
    release, stop = threading.Event(), threading.Event()
    with running_redis(cwd) as server:
        app = make_app(server.url, release)
        started = threading.Event()

        async def serve() -> None:
            async with app.running():
                started.set()
                await anyio.to_thread.run_sync(stop.wait)

        thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True)
        thread.start()
        try:
            assert started.wait(20), "the worker did not start"
            yield Bus(cwd, cli_env(OMNIDAEMON_BROKER_URL=server.url), release)
        finally:
            release.set()
            stop.set()
            thread.join(20)


@pytest.fixture(scope="module")
def failed(bus: Bus) -> Trace:
    """A run of the pipeline whose second stage dead-letters its event."""
    return bus.finished(bus.publish(DOC, {"name": "a.pdf", "fail": True}), "failed")


@pytest.fixture(scope="module")
def succeeded(bus: Bus) -> Trace:
    return bus.finished(bus.publish(DOC, {"name": "b.pdf"}), "succeeded")


def test_trace_draws_events_agents_attempts_and_what_each_handling_published(
    bus: Bus, failed: Trace
) -> None:
    shown = bus.cli("trace", failed.run_id)

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    [root] = failed.events
    [text] = [c for c in root.children if c.topic == TEXT]
    [audit] = [c for c in root.children if c.topic == AUDIT]
    assert lines[0].startswith(f"run {failed.run_id}  failed in ")
    assert "3 events, 3 attempts  started " in lines[0]
    assert lines[1] == f"└── {DOC}  …{failed.run_id[-8:]}  from cli"
    assert lines[2] == "    └── extract  succeeded  after 2 attempts"
    assert lines[3].startswith("        ├── attempt 1  retrying  ")
    assert lines[3].endswith("  RuntimeError: flaky storage")
    assert lines[4].startswith("        ├── attempt 2  succeeded  ")
    # The events the handling published hang under it, each with its own handlings; the one
    # no agent reads says so.
    at = lines.index(f"        ├── {TEXT}  …{text.id[-8:]}")
    assert lines[at + 1] == "        │   └── summarise  dead_lettered"
    assert lines[at + 2].startswith("        │       └── attempt 1  dead_lettered  ")
    assert lines[at + 2].endswith("  RuntimeError: model refused a.pdf")
    assert f"        └── {AUDIT}  …{audit.id[-8:]}  no handling recorded" in lines
    assert lines[-1] == (
        f"failed: summarise on {TEXT} …{text.id[-8:]}: RuntimeError: model refused a.pdf"
    )
    # Any event of the run finds it.
    by_child = bus.cli("trace", text.id, "--full-ids")
    assert by_child.stdout.splitlines()[0] == lines[0]
    assert f"{TEXT}  {text.id}" in by_child.stdout


def test_trace_json_is_the_trace(bus: Bus, failed: Trace) -> None:
    shown = bus.cli("trace", failed.run_id, "--json")

    trace = Trace.model_validate(orjson.loads(shown.stdout))
    assert trace.run_id == failed.run_id
    assert trace.status == "failed"
    [root] = trace.events
    [extract] = root.handlings
    assert [a.outcome for a in extract.attempts] == ["retrying", "succeeded"]
    assert extract.attempts[0].error == {"type": "RuntimeError", "message": "flaky storage"}
    [text] = [c for c in root.children if c.topic == TEXT]
    assert text.published_by == "extract"
    assert [(f["agent"], f["topic"]) for f in trace.failures] == [("summarise", TEXT)]


def test_runs_lists_recent_runs_and_filters_them_by_status(
    bus: Bus, failed: Trace, succeeded: Trace
) -> None:
    listed = bus.cli("runs")
    only_failed = bus.cli("runs", "--status", "failed", "--since", "15m", "--json")

    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["RUN", "ID", "STATUS", "STARTED", "DURATION", "EVENTS", "FAILURE"]
    by_id = {row.split()[0]: row.split(None, 6) for row in rows}
    _, status, _, ago, _, events, failure = by_id[failed.run_id]
    assert (status, ago, events) == ("failed", "ago", "3")
    assert failure == "summarise: RuntimeError: model refused a.pdf"
    assert by_id[succeeded.run_id][1] == "succeeded"
    assert len(by_id[succeeded.run_id]) == 6  # no failure
    assert [r["run_id"] for r in orjson.loads(only_failed.stdout)] == [failed.run_id]
    assert orjson.loads(only_failed.stdout)[0]["error"]["message"] == "model refused a.pdf"


def test_runs_refuses_a_bad_since_in_one_line(bus: Bus) -> None:
    refused = bus.cli("runs", "--since", "5x")

    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "omnidaemon runs: error: Invalid value for '--since': '5x' is not a duration: write "
        "it as 30s, 15m, 1h, 2d or 1h30m (see 'omnidaemon runs --help')"
    ]


def test_trace_of_an_unknown_id_is_one_line_and_status_1(bus: Bus) -> None:
    unknown = str(uuid.uuid4())
    for args in (("trace", unknown), ("trace", unknown, "--json")):
        refused = bus.cli(*args)
        assert refused.returncode == 1
        assert refused.stdout == ""
        [line] = refused.stderr.splitlines()
        assert line.startswith(f"omnidaemon trace: error: no trace of {unknown!r} on the bus")


def test_follow_waits_for_the_run_to_end(bus: Bus) -> None:
    event_id = bus.publish(SLOW, {"n": 1})
    wait_for(
        lambda: (found := bus.trace(event_id)) is not None and found.status == "running",
        20,
        "the slow agent to start",
        interval=0.05,
    )
    releaser = threading.Timer(1.0, bus.release.set)
    releaser.start()
    started = time.monotonic()
    try:
        followed = bus.cli("trace", event_id, "--follow")
    finally:
        releaser.cancel()
        bus.release.set()

    assert followed.returncode == 0, followed.stderr
    assert time.monotonic() - started >= 0.5  # it waited for the release
    lines = followed.stdout.splitlines()
    assert lines[0].startswith(f"run {event_id}  succeeded in ")
    assert lines[2] == "    └── slow  succeeded"


def test_result_of_an_event_with_no_stored_result_points_at_its_runs_trace(
    bus: Bus, failed: Trace
) -> None:
    shown = bus.cli("result", failed.run_id)

    assert shown.returncode == 3  # unchanged: nothing is stored for the event
    assert shown.stdout.splitlines()[0] == f"{failed.run_id}  no result stored for this event"
    assert shown.stderr.splitlines()[-1] == (
        f"omnidaemon result: no result stored for this event; its run {failed.run_id} is "
        f"failed: see omnidaemon trace {failed.run_id}"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172_800), ("1h30m", 5400), ("90", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "5x", "h", "1h 30", "-1m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_the_tree_shows_attempts_under_way_abandoned_and_dropped_records() -> None:
    from datetime import UTC, datetime

    from rich.console import Console

    from omnidaemon.cli._trace_view import trace_view
    from omnidaemon.traces import AttemptTrace, EventTrace, HandlingTrace

    began = datetime(2026, 12, 3, 9, 0, 0, tzinfo=UTC)
    attempts = [
        AttemptTrace(attempt=1, outcome="abandoned", worker="w1", started_at=began),
        AttemptTrace(attempt=2, outcome="abandoned"),
        AttemptTrace(attempt=3, outcome="running", worker="w2", started_at=began),
    ]
    trace = Trace(
        run_id="order-7",
        status="running",
        started_at=began,
        events=[
            EventTrace(
                id="01a23b4d-5b2f-74cf-bb4f-65c0e04a4e31",
                topic="order.placed",
                source="shop",
                handlings=[HandlingTrace(agent="bill", status="running", attempts=attempts)],
            )
        ],
        event_count=1,
        attempt_count=3,
        dropped=12,
    )
    console = Console(width=1000, no_color=True, highlight=False, markup=False, record=True)
    with console.capture() as captured:
        console.print(trace_view(trace, now=began + timedelta(seconds=4)))

    assert captured.get().splitlines() == [
        "run order-7  running  1 event, 3 attempts  started 2026-12-03 09:00:00  12 records "
        "dropped (OMNIDAEMON_TRACE_MAX_RECORDS)",
        "└── order.placed  …e04a4e31  from shop",
        "    └── bill  running  after 3 attempts",
        "        ├── attempt 1  abandoned  on w1",
        "        ├── attempt 2  abandoned  (no record: its worker stopped before writing one)",
        "        └── attempt 3  running  for 4.0s  on w2",
    ]
