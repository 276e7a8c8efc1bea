"""`omnidaemon worker --reload`: editing the app's code restarts the worker, and the next
event is handled by the new code. A real worker process on the session's redis-server."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from omnidaemon import App
from tests.e2e._support import (
    WorkerProcess,
    cli_env,
    read_lines,
    run_cli,
    wait_for,
    write_module,
)

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 20.0

VERSIONED_APP = """
    import os

    from omnidaemon import App

    app = App("versioned")

    @app.agent(os.environ["E2E_TOPIC"])
    async def work(event: dict) -> None:
        with open(os.environ["E2E_LOG"], "a") as f:
            f.write(f"VERSION {event['n']}\\n")
"""


def publish(url: str, topic: str, n: int) -> None:
    async def send() -> None:
        async with App("publisher", broker=url) as app:
            await app.publish(topic, {"n": n})

    anyio.run(send)


def test_editing_the_app_restarts_the_worker_with_the_new_code(
    spawn: Callable[..., WorkerProcess], tmp_path: Path, redis_url: str
) -> None:
    topic = f"reload.{uuid.uuid4().hex[:8]}"
    log = tmp_path / "handled.log"
    app_file = write_module(tmp_path, "versioned", VERSIONED_APP.replace("VERSION", "v1"))
    worker = spawn(
        ["./versioned.py", "--reload"],
        tmp_path,
        # Bytecode written, as by default (empty: not set).
        cli_env(
            OMNIDAEMON_BROKER_URL=redis_url,
            E2E_LOG=str(log),
            E2E_TOPIC=topic,
            PYTHONDONTWRITEBYTECODE="",
        ),
    )

    def started() -> int:
        return sum(e["event"] == "worker started" for e in worker.logs())

    wait_for(lambda: started() == 1, STARTUP_TIMEOUT, "the first worker")
    publish(redis_url, topic, 1)
    wait_for(lambda: read_lines(log) == ["v1 1"], 10, "the first event")

    # The edit keeps the file's size and, here, its mtime: Python would take the first
    # worker's cached bytecode for it (it compares the two, in whole seconds), and an edit
    # within the second of the last compile is the same. The reloader drops that bytecode.
    before = app_file.stat()
    app_file.write_text(app_file.read_text().replace("v1", "v2"))
    os.utime(app_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    wait_for(lambda: started() == 2, STARTUP_TIMEOUT, "the worker to restart")
    publish(redis_url, topic, 2)
    # The new worker may still be starting its consumers on a loaded machine: as long as a
    # start may take. On a timeout, say what was handled and what the worker logged.
    try:
        wait_for(lambda: read_lines(log) == ["v1 1", "v2 2"], STARTUP_TIMEOUT, "the next event")
    except AssertionError as exc:
        events = [e["event"] for e in worker.logs()]
        raise AssertionError(f"{exc}: handled {read_lines(log)}; worker logged {events}") from None

    worker.send(signal.SIGTERM)
    status, _ = worker.wait_exit(timeout=15)
    assert status == 0, worker.stderr
    logs = worker.logs()  # every stderr line is a JSON log line
    changed = [e for e in logs if e["event"] == "files changed; restarting the worker"]
    assert [e["files"] for e in changed] == [["versioned.py"]]
    assert sum(e["event"] == "worker stopped" for e in logs) == 2, "each worker stopped cleanly"


def test_reload_without_watchfiles_is_one_line(tmp_path: Path) -> None:
    # A `watchfiles` module that cannot be imported stands for the missing extra.
    write_module(tmp_path / "hide" / "watchfiles", "__init__", "raise ImportError('hidden')\n")
    write_module(tmp_path, "versioned", VERSIONED_APP)
    env = cli_env(PYTHONPATH=str(tmp_path / "hide"))
    result = run_cli(["worker", "versioned:app", "--reload"], cwd=tmp_path, env=env)

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "omnidaemon worker: error: --reload needs the watchfiles package: "
        "pip install 'omnidaemon[reload]'"
    ]
