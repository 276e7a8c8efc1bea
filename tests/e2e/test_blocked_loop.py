"""A handler that blocks the worker's event loop gets one warning naming it and the fix;
handlers that leave the loop free get none.

The worker runs as a real process (`omnidaemon worker`): the watchdog is a thread that must
log while the loop is stuck, which only a real blocked process shows. One worker shows both, one
after the other: the app publishes `job.free` from an `on_startup` hook, handled by
well-behaved handlers only; once they are done, it logs `free handlers done` and publishes
`job.run`, handled by the blocking handler and the same well-behaved ones with it. The handlers
note `free <event id>`, `half <event id>` and `done <event id>` in the file `E2E_LOG` names.
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
    import structlog

    from omnidaemon import App, Context

    app = App("loop")


    def note(line):
        with open(os.environ["E2E_LOG"], "a") as f:
            f.write(line + "\\n")


    def noted():
        try:
            with open(os.environ["E2E_LOG"]) as f:
                return f.read().splitlines()
        except FileNotFoundError:  # nothing noted yet
            return []


    @app.on_startup
    async def publish():
        await app.publish("job.free", {"n": 1})


    @app.agent("job.free", name="gate")
    async def gate(event: dict) -> None:
        # The well-behaved handlers alone first; the blocking one only once they are done.
        while len(noted()) < 2:
            await anyio.sleep(0.02)
        structlog.get_logger().info("free handlers done")
        await app.publish("job.run", {"n": 2})


    @app.agent("job.run", name="sleepy")
    async def sleepy(event: dict, ctx: Context) -> None:
        time.sleep(3)  # blocks the loop: the mistake the watchdog points out
        note(f"done {ctx.event.id}")


    # Well-behaved handlers, on their own (`job.free`), then in flight at the same time as
    # `sleepy` (`job.run`).
    async def polite(event: dict, ctx: Context) -> None:
        await anyio.sleep(1.5)
        note(f"{'free' if ctx.event.topic == 'job.free' else 'half'} {ctx.event.id}")


    def threaded(event: dict, ctx: Context) -> None:
        time.sleep(1.5)  # a plain `def` runs in a thread: the loop stays free
        note(f"{'free' if ctx.event.topic == 'job.free' else 'half'} {ctx.event.id}")


    for topic in ("job.free", "job.run"):
        app.agent(topic, name=f"polite-{topic}")(polite)
        app.agent(topic, name=f"threaded-{topic}")(threaded)
"""


def test_one_warning_names_the_blocking_handler_and_none_comes_while_the_loop_is_free(
    tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    """Named among handlers in flight with it: the watchdog reads the loop thread's stack.
    Before it, the well-behaved handlers alone get no warning (that part fails on a watchdog
    that warns about them; the rest fails on a worker without a watchdog)."""
    write_module(tmp_path, "loop_app", APP)
    log = tmp_path / "e2e.log"
    worker = spawn(["loop_app:app"], tmp_path, cli_env(E2E_LOG=str(log)))
    notes = wait_for(
        lambda: len(read_lines(log)) >= 5 and read_lines(log),
        STARTUP_TIMEOUT,
        "the handlers to finish",
    )
    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(15)
    assert status == 0, worker.stderr
    assert worker.has_logged("worker stopped")

    # The well-behaved handlers alone: no warning before they were done.
    assert sorted(note.split()[0] for note in notes[:2]) == ["free", "free"]
    logs = worker.logs()
    free_done = next(n for n, line in enumerate(logs) if line["event"] == "free handlers done")
    assert not any(BLOCKED in line["event"] for line in logs[:free_done])

    # Then the blocking one, with the well-behaved ones in flight: one warning, naming it.
    [event_id] = [note.removeprefix("done ") for note in notes if note.startswith("done ")]
    assert sorted(note.split()[0] for note in notes[2:]) == ["done", "half", "half"]
    warnings = [line for line in logs if BLOCKED in line["event"]]
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
