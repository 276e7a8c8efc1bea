"""Helpers for the end-to-end tests: run `python -m omnidaemon` as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

__all__ = [
    "SHARED_BUSES",
    "WorkerProcess",
    "buses_chosen",
    "cli_env",
    "read_lines",
    "run_cli",
    "side_by_side",
    "spawn_workers",
    "wait_for",
    "write_module",
]

CLI = [sys.executable, "-m", "omnidaemon"]


def cli_env(**extra: str) -> dict[str, str]:
    """Env for a CLI subprocess: no inherited `OMNIDAEMON_*`, the memory bus, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIDAEMON_")}
    env["OMNIDAEMON_BROKER_URL"] = "memory://"
    env["OMNIDAEMON_LOG_FORMAT"] = "json"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def write_module(directory: Path, name: str, source: str) -> Path:
    """Write `source` (dedented) as `directory/name.py` and return the path."""
    path = directory / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def run_cli(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m omnidaemon ARGS` to completion and capture its output."""
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(
    predicate: Callable[[], Any], timeout: float, message: str = "", interval: float = 0.02
) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)


def read_lines(path: Path) -> list[str]:
    """The complete lines of a file (a half-written last line is left out); [] if missing."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return lines[:-1]


class WorkerProcess:
    """A `python -m omnidaemon worker ...` subprocess, its stderr going to a file we can poll."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self.stderr_path = cwd / f"worker-{time.monotonic_ns()}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "worker", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def logs(self) -> list[dict[str, Any]]:
        """Every complete stderr line parsed as JSON (fails if a line is not JSON)."""
        return [orjson.loads(line) for line in read_lines(self.stderr_path)]

    def has_logged(self, fragment: str) -> bool:
        return any(fragment in line for line in read_lines(self.stderr_path))

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Wait for the process to exit; return its status and how long that took."""
        start = time.monotonic()
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {timeout} s later; stderr:\n{self.stderr}"
            ) from None
        return status, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()


def spawn_workers() -> Iterator[Callable[..., WorkerProcess]]:
    """Body of a fixture: yields a factory of workers and kills any still running afterwards."""
    started: list[WorkerProcess] = []

    def spawn(args: Sequence[str], cwd: Path, env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(args, cwd, env)
        started.append(worker)
        return worker

    try:
        yield spawn
    finally:
        for worker in started:
            worker.kill()


SHARED_BUSES: dict[str, str] = {"redis": "redis_url", "nats": "nats_url", "cluster": "cluster_url"}
"""The buses a process test runs a scenario on, by name: the fixture giving each one's URL."""


def buses_chosen(request: pytest.FixtureRequest, variable: str) -> dict[str, str]:
    """The URLs of the shared buses, by name: all of them, or those listed in the environment
    variable `variable` (`T_FLOW_BUSES=redis,nats`), to run a long test on some."""
    only = os.environ.get(variable)
    return {
        name: request.getfixturevalue(fixture)
        for name, fixture in SHARED_BUSES.items()
        if only is None or name in only.split(",")
    }


def side_by_side(runs: Mapping[str, Callable[[], str]]) -> dict[str, str]:
    """Run scenarios at once, one thread each (each with its own worker processes, mostly
    waiting: one after another would cost the suite their sum), and print their figures for
    `pytest -s`. A scenario's failure is raised once all have ended."""
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(run) for name, run in runs.items()}
        figures = {name: future.result() for name, future in futures.items()}
    for name, line in figures.items():
        print(f"{name}: {line}")
    return figures
