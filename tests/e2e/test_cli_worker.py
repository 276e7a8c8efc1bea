"""`omnidaemon worker` as a real process: running agents, and stopping (DESIGN.md 4.7).

The app modules publish their own events from an `on_startup` hook (the memory bus lives in
the worker process) and record what their handlers do in a file named by `E2E_LOG`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e._support import (
    WorkerProcess,
    cli_env,
    read_lines,
    wait_for,
    write_module,
)

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 20.0  # seconds a fresh worker may take to import and start handling
PROMPT = 5.0  # seconds within which a stop that should be prompt must have happened

JOBS_APP = """
    import os
    import time

    import anyio

    from omnidaemon import App, Context

    app = App("jobs")

    LOG = os.environ["E2E_LOG"]
    EVENTS = int(os.environ.get("E2E_EVENTS", "1"))
    SLEEP = float(os.environ.get("E2E_SLEEP", "1"))
    CONCURRENCY = int(os.environ.get("E2E_CONCURRENCY", "16"))


    def note(line):
        with open(LOG, "a") as f:
            f.write(line + "\\n")


    @app.on_startup
    async def publish_jobs():
        for i in range(EVENTS):
            await app.publish("job.run", {"id": i})


    @app.on_shutdown
    async def goodbye():
        note("shutdown")


    if os.environ.get("E2E_SYNC") == "1":

        @app.agent("job.run", name="work", concurrency=CONCURRENCY)
        def work(event: dict) -> None:
            note(f"start {event['id']}")
            time.sleep(SLEEP)
            note(f"done {event['id']}")

    else:

        @app.agent("job.run", name="work", concurrency=CONCURRENCY)
        async def work(event: dict, ctx: Context) -> None:
            note(f"start {event['id']}")
            await anyio.sleep(SLEEP)
            note(f"done {event['id']}")
"""

PIPELINE_APP = """
    import os
    import threading

    import anyio

    from omnidaemon import App, Context

    app = App("pipeline")

    LOG = os.environ["E2E_LOG"]


    def note(line):
        with open(LOG, "a") as f:
            f.write(line + "\\n")


    @app.on_startup
    async def publish_jobs():
        for i in range(2):
            await app.publish("job.run", {"id": i})


    @app.agent("job.run")
    async def a(event: dict) -> None:
        await anyio.sleep(0.3)  # gives agent b, were it running, time to handle the same event
        note(f"a {event['id']}")


    @app.agent("job.run", publishes="job.checked")
    def b(event: dict) -> dict:
        on_main = threading.current_thread() is threading.main_thread()
        note(f"b {event['id']} main_thread={on_main}")
        return {"id": event["id"], "checked_by": "b"}


    @app.agent("job.checked")
    async def c(event: dict, ctx: Context) -> None:
        caused = ctx.event.causation_id is not None
        note(f"c {event['id']} checked_by={event['checked_by']} causation={caused}")
"""


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "handlers.log"


def start_worker(
    spawn: Callable[..., WorkerProcess],
    tmp_path: Path,
    log_file: Path,
    args: list[str],
    *,
    module: str = "jobs",
    **env: str,
) -> WorkerProcess:
    source = JOBS_APP if module == "jobs" else PIPELINE_APP
    write_module(tmp_path, module, source)
    return spawn([f"{module}:app", *args], tmp_path, cli_env(E2E_LOG=str(log_file), **env))


def lines_starting(log_file: Path, prefix: str) -> list[str]:
    return [line for line in read_lines(log_file) if line.startswith(prefix)]


def ids(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines}


def events(worker: WorkerProcess) -> list[str]:
    return [entry["event"] for entry in worker.logs()]


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_sigterm_lets_in_flight_handlers_finish(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path, kind: str
) -> None:
    grace = 10.0
    worker = start_worker(
        spawn,
        tmp_path,
        log_file,
        ["--shutdown-grace", str(grace)],
        E2E_EVENTS="4",
        E2E_CONCURRENCY="2",
        E2E_SLEEP="1",
        E2E_SYNC="1" if kind == "sync" else "0",
    )
    wait_for(
        lambda: len(lines_starting(log_file, "start")) == 2,
        STARTUP_TIMEOUT,
        "two handlers to start",
    )
    assert lines_starting(log_file, "done") == [], "handlers finished before the signal"

    worker.send(signal.SIGTERM)
    status, elapsed = worker.wait_exit(timeout=grace + 5)

    assert status == 0, worker.stderr
    assert elapsed < grace
    started = ids(lines_starting(log_file, "start"))
    # Every handler in flight at the signal finished; no new event was fetched after it.
    assert ids(lines_starting(log_file, "done")) == started
    assert len(started) == 2
    # The shutdown hook ran, after the last handler.
    assert read_lines(log_file)[-1] == "shutdown"
    logged = events(worker)  # every stderr line is a JSON object
    assert logged[0] == "worker started"
    assert logged[-1] == "worker stopped"
    stopping = next(e for e in worker.logs() if e["event"].startswith("stopping"))
    assert stopping["signal"] == "SIGTERM"
    assert not any("grace period over" in event for event in logged)


@pytest.mark.parametrize(
    ("kind", "signum"),
    [("async", signal.SIGTERM), ("sync", signal.SIGINT)],
    ids=["async-sigterm", "sync-sigint"],
)
def test_second_signal_exits_at_once(
    spawn: Callable[..., WorkerProcess],
    tmp_path: Path,
    log_file: Path,
    kind: str,
    signum: signal.Signals,
) -> None:
    worker = start_worker(
        spawn,
        tmp_path,
        log_file,
        [],
        E2E_SLEEP="60",
        E2E_SYNC="1" if kind == "sync" else "0",
    )
    wait_for(lambda: lines_starting(log_file, "start"), STARTUP_TIMEOUT, "the handler to start")

    worker.send(signum)
    wait_for(lambda: worker.has_logged("stopping"), PROMPT, "the worker to start stopping")
    assert worker.proc.poll() is None, "the first signal must wait for the 60 s handler"
    worker.send(signum)
    status, _ = worker.wait_exit(timeout=PROMPT)

    assert status == 128 + signum, worker.stderr  # the shell convention for "killed by"
    assert lines_starting(log_file, "done") == []
    assert "exiting now" in events(worker)


def test_shutdown_grace_runs_out(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path
) -> None:
    worker = start_worker(spawn, tmp_path, log_file, ["--shutdown-grace", "0.5"], E2E_SLEEP="60")
    wait_for(lambda: lines_starting(log_file, "start"), STARTUP_TIMEOUT, "the handler to start")

    worker.send(signal.SIGTERM)
    worker.wait_exit(timeout=PROMPT)

    assert lines_starting(log_file, "done") == []
    assert read_lines(log_file)[-1] == "shutdown"
    over = [e for e in worker.logs() if "grace period over" in e["event"]]
    assert len(over) == 1, worker.stderr
    assert over[0]["agent"] == "work"
    assert over[0]["handlers"] == 1
    assert over[0]["grace"] == 0.5
    assert events(worker)[-1] == "worker stopped"


def test_shutdown_grace_runs_out_for_sync_handler(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path
) -> None:
    worker = start_worker(
        spawn, tmp_path, log_file, ["--shutdown-grace", "0.5"], E2E_SLEEP="30", E2E_SYNC="1"
    )
    wait_for(lambda: lines_starting(log_file, "start"), STARTUP_TIMEOUT, "the handler to start")

    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(timeout=PROMPT)  # does not wait for the abandoned thread

    assert status == 0, worker.stderr
    assert lines_starting(log_file, "done") == []


def test_concurrency_option_bounds_handlers_in_flight_and_an_idle_worker_stops_promptly(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path
) -> None:
    # The agent declares concurrency=16; `--concurrency 1` overrides it: one at a time.
    worker = start_worker(
        spawn, tmp_path, log_file, ["--concurrency", "1"], E2E_EVENTS="3", E2E_SLEEP="0.2"
    )
    wait_for(
        lambda: len(lines_starting(log_file, "done")) == 3,
        STARTUP_TIMEOUT,
        "three handlers to finish",
    )

    # Every event handled: the worker is idle, waiting for the next; SIGTERM stops it promptly.
    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(timeout=PROMPT)

    assert status == 0, worker.stderr
    handled = [line.split()[0] for line in read_lines(log_file)]
    assert handled == ["start", "done"] * 3 + ["shutdown"]
    started = worker.logs()[0]
    assert started["event"] == "worker started"
    assert started["app"] == "jobs"
    assert started["agents"] == ["work"]
    assert started["broker"] == "memory://"
    assert events(worker)[-1] == "worker stopped"


def test_agents_option_runs_only_the_named_agents(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path
) -> None:
    worker = start_worker(spawn, tmp_path, log_file, ["--agents", "a"], module="pipeline")
    wait_for(
        lambda: ids(lines_starting(log_file, "a ")) == {"0", "1"},
        STARTUP_TIMEOUT,
        "agent a to handle both events",
    )

    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(timeout=PROMPT)

    assert status == 0, worker.stderr
    assert sorted(read_lines(log_file)) == ["a 0", "a 1"]
    assert worker.logs()[0]["agents"] == ["a"]


def test_sync_handler_runs_in_a_thread_and_publishes_its_result(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, log_file: Path
) -> None:
    worker = start_worker(spawn, tmp_path, log_file, [], module="pipeline")
    wait_for(
        lambda: (
            ids(lines_starting(log_file, "c ")) == {"0", "1"}
            and ids(lines_starting(log_file, "a ")) == {"0", "1"}
        ),
        STARTUP_TIMEOUT,
        "every agent to handle both events",
    )

    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(timeout=PROMPT)

    assert status == 0, worker.stderr
    assert sorted(lines_starting(log_file, "b ")) == [
        "b 0 main_thread=False",
        "b 1 main_thread=False",
    ]
    assert sorted(lines_starting(log_file, "c ")) == [
        "c 0 checked_by=b causation=True",
        "c 1 checked_by=b causation=True",
    ]
    assert worker.logs()[0]["agents"] == ["a", "b", "c"]
