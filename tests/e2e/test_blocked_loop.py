"""A handler that blocks the worker's event loop gets one warning naming it and the fix.

The worker runs as a real process (`omnidaemon worker`): the watchdog is a thread that must
log while the loop is stuck, which only a real blocked process shows. The app publishes its own
event from an `on_startup` hook and notes `done <event id>` in the file `E2E_LOG` names.
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

STARTUP_TIMEOUT = 20.0
BLOCKED = "the event loop has been blocked"

APP = """
    import os
    import time

    import anyio

    from omnidaemon import App, Context

    app = App("loop")


    def note(line):
        with open(os.environ["E2E_LOG"], "a") as f:
            f.write(line + "\\n")


    @app.on_startup
    async def publish():
        await app.publish("job.run", {"n": 1})


    if os.environ["E2E_MODE"] == "blocking":

        @app.agent("job.run", name="sleepy")
        async def sleepy(event: dict, ctx: Context) -> None:
            time.sleep(3)  # blocks the loop: the mistake the watchdog points out
            note(f"done {ctx.event.id}")


    # Well-behaved handlers, in flight at the same time as `sleepy` when it runs.
    @app.agent("job.run", name="polite")
    async def polite(event: dict, ctx: Context) -> None:
        await anyio.sleep(1.5)
        note(f"half {ctx.event.id}")


    @app.agent("job.run", name="threaded")
    def threaded(event: dict, ctx: Context) -> None:
        time.sleep(1.5)  # a plain `def` runs in a thread: the loop stays free
        note(f"half {ctx.event.id}")
"""


def _run(
    tmp_path: Path, spawn: Callable[..., WorkerProcess], mode: str, notes: int
) -> tuple[WorkerProcess, list[str]]:
    """Run the worker until its handlers noted `notes` lines, then stop it gracefully."""
    write_module(tmp_path, "loop_app", APP)
    log = tmp_path / "e2e.log"
    worker = spawn(["loop_app:app"], tmp_path, cli_env(E2E_LOG=str(log), E2E_MODE=mode))
    lines = wait_for(
        lambda: len(read_lines(log)) >= notes and read_lines(log),
        STARTUP_TIMEOUT,
        "the handlers to finish",
    )
    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(15)
    assert status == 0, worker.stderr
    return worker, lines


def test_a_handler_blocking_the_loop_gets_one_warning_naming_it_and_the_fix(
    tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    """Named among handlers in flight with it: the watchdog reads the loop thread's stack."""
    worker, notes = _run(tmp_path, spawn, "blocking", 3)
    [event_id] = [note.removeprefix("done ") for note in notes if note.startswith("done ")]
    warnings = [line for line in worker.logs() if BLOCKED in line["event"]]
    assert len(warnings) == 1, warnings
    [warning] = warnings
    assert warning["level"] == "warning"
    assert warning["agent"] == "sleepy"
    assert warning["event_id"] == event_id
    assert warning["handler"] == "loop_app.sleepy"
    source = (tmp_path / "loop_app.py").read_text().splitlines()
    line = next(n for n, text in enumerate(source, 1) if "time.sleep(3)" in text)
    assert warning["where"].endswith(f"loop_app.py:{line} in sleepy")  # the blocking call
    assert "plain `def`" in warning["event"]
    assert "anyio.to_thread.run_sync" in warning["event"]


def test_handlers_that_leave_the_loop_free_get_no_warning(
    tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    """The complement of the test above (which fails on a worker without a watchdog)."""
    worker, _ = _run(tmp_path, spawn, "polite", 2)
    assert worker.has_logged("worker stopped")
    assert not worker.has_logged(BLOCKED)
