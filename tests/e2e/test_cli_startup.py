"""`omnidaemon worker` started before its bus: it waits, one log line per attempt, and handles
events once the bus is up; a bound on the wait, and settings the bus refuses, end it with one
line (exit 1 and 2). Real processes, a real redis-server on a port chosen before it starts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from omnidaemon import App
from tests.e2e._support import (
    WorkerProcess,
    cli_env,
    read_lines,
    wait_for,
    write_module,
)
from tests.servers import RedisServer, free_port, running_redis

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 20.0  # seconds a fresh worker may take to import and start handling
RETRYING = "cannot reach the bus; retrying"

ECHO_APP = """
    import os

    from omnidaemon import App

    app = App("echo")

    @app.agent("job.run")
    async def work(event: dict) -> None:
        with open(os.environ["E2E_LOG"], "a") as f:
            f.write(f"handled {event['id']}\\n")
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_module(tmp_path, "echo", ECHO_APP)
    return tmp_path


def publish(url: str, payload: dict[str, object]) -> None:
    async def send() -> None:
        async with App("publisher", broker=url) as app:
            await app.publish("job.run", payload)

    anyio.run(send)


def assert_one_error_line(stderr: str, *fragments: str) -> str:
    """No traceback, and exactly one line that is not a JSON log line, holding `fragments`."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def test_worker_started_before_the_bus_waits_for_it_then_handles_events(
    spawn: Callable[..., WorkerProcess], project: Path
) -> None:
    server = RedisServer(project)
    server.port = free_port()  # nothing listens there yet
    log = project / "handled.log"
    worker = spawn(
        ["echo:app"], project, cli_env(OMNIDAEMON_BROKER_URL=server.url, E2E_LOG=str(log))
    )
    try:
        wait_for(
            lambda: len([e for e in worker.logs() if e["event"] == RETRYING]) >= 2,
            STARTUP_TIMEOUT,
            "two attempts to reach the bus",
        )
        server.start()
        wait_for(lambda: worker.has_logged('"worker started"'), STARTUP_TIMEOUT, "the start")
        publish(server.url, {"id": 7})
        wait_for(lambda: read_lines(log) == ["handled 7"], 10, "the event to be handled")
    finally:
        server.stop()

    logs = worker.logs()  # every line is a JSON log line: nothing else was printed
    attempts = [e for e in logs if e["event"] == RETRYING]
    assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
    assert all(e["level"] == "warning" and "ConnectionError" in e["error"] for e in attempts)
    assert all(e["bus"] == server.url for e in attempts)
    reached = [e for e in logs if e["event"] == "reached the bus"]
    assert [e["attempts"] for e in reached] == [len(attempts) + 1]
    assert "Traceback" not in worker.stderr


@pytest.mark.parametrize("how", ["option", "environment"])
def test_connect_timeout_bounds_the_wait_with_one_line_and_status_1(
    spawn: Callable[..., WorkerProcess], project: Path, how: str
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = cli_env(OMNIDAEMON_BROKER_URL=url, E2E_LOG=str(project / "log"))
    args = ["echo:app"]
    if how == "option":
        args += ["--connect-timeout", "1.5"]
    else:
        env["OMNIDAEMON_CONNECT_TIMEOUT"] = "1.5"
    worker = spawn(args, project, env)

    status, _ = worker.wait_exit(timeout=STARTUP_TIMEOUT)

    assert status == 1, worker.stderr
    line = assert_one_error_line(worker.stderr, url, "did not answer within 1.5 s")
    assert line.startswith("omnidaemon worker: error: ")
    assert worker.stderr.splitlines()[-1] == line, "the error is the last word"
    assert worker.stderr.count(RETRYING) >= 2


@pytest.mark.parametrize("processes", [1, 2])
def test_wrong_password_is_one_line_and_status_2_at_once(
    project: Path, tmp_path_factory: pytest.TempPathFactory, processes: int
) -> None:
    directory = tmp_path_factory.mktemp("redis-auth")
    with running_redis(directory, password="right-password") as server:
        url = server.url.replace("right-password", "wrong-password")
        result = subprocess.run(
            [sys.executable, "-m", "omnidaemon", "worker", "echo:app"]
            + (["--processes", str(processes)] if processes > 1 else []),
            cwd=project,
            env=cli_env(OMNIDAEMON_BROKER_URL=url, E2E_LOG=str(project / "log")),
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
        )

    stderr = result.stderr
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert "wrong-password" not in stderr and "right-password" not in stderr
    errors = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == processes, stderr  # one line from each worker process
    assert all("refused the broker URL's credentials" in line for line in errors)
    assert RETRYING not in stderr, "credentials are not retried"
    assert "exited; restarting it" not in stderr, "the supervisor does not crash-loop"


def test_broker_url_with_a_bad_port_is_one_line_and_status_2(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "omnidaemon", "worker", "echo:app"],
        cwd=project,
        env=cli_env(OMNIDAEMON_BROKER_URL="redis://:secret@localhost:63x9/0"),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    line = assert_one_error_line(result.stderr, "port is not a number")
    assert "secret" not in line
