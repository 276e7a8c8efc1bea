"""The multi-process supervisor, with real processes on a real Redis.

Each test runs `python -m omnidaemon worker APP --processes N`, the operator's command, as a
subprocess and drives it with signals (`tests/worker/_supervise.py`, a `Supervisor` with timings
a test can shrink, is there for tests that need that). The children run `_supervised_app.py`,
whose handler records each step with its pid in a file; the supervisor's and the children's
JSON logs share one stderr file.

The tests at the end run a `Supervisor` in the test's own event loop with tiny `python -c`
children, for the rules that need no bus: backoff, the exit status of a stop, the kill after
the grace period, and no orphans after a cancellation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import orjson
import pytest
import redis
from structlog.testing import capture_logs

from omnidaemon import App, Backoff
from omnidaemon.brokers import RedisBroker
from omnidaemon.worker import supervisor as supervisor_module
from omnidaemon.worker.supervisor import Supervisor
from tests.e2e._support import cli_env, read_lines, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_supervise.py")
APP = "tests.worker._supervised_app:app"
STARTUP = 20.0  # seconds fresh worker processes may take to import and subscribe
SETTLE = 20.0  # seconds within which the work of one test must be done once it can be


def alive(pid: int) -> bool:
    """True if `pid` is a running (not zombie) omnidaemon process: a pid reused by anything
    else does not count."""
    if not Path("/proc/self").exists():  # no procfs (macOS): existence is all we can see
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"omnidaemon" in cmdline and state != "Z"


@dataclass(frozen=True)
class Step:
    """One line the handler recorded."""

    key: str
    attempt: int
    phase: str
    pid: int
    index: str | None


class Supervised:
    """A running `_supervise.py`, its handlers' records and its (and its children's) logs."""

    def __init__(
        self, processes: int, app: str, args: Sequence[str], env: dict[str, str], *, cli: bool
    ) -> None:
        self.log = Path(env["T_LOG"])
        self.stderr_path = self.log.with_suffix(f".{time.monotonic_ns()}.stderr")
        # Append mode: the children write through the same open file.
        with self.stderr_path.open("ab") as stderr:
            # The operator's command line, or the driver where a test shrinks the timings.
            command = [sys.executable, str(DRIVER), str(processes), app, *args]
            if cli:
                command = [sys.executable, "-m", "omnidaemon", "worker", app, *args]
                command += ["--processes", str(processes), "--log-format", "json"]
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (the children's plain error messages left out), optionally only
        those whose event is `event`."""
        entries = [orjson.loads(line) for line in read_lines(self.stderr_path) if line[:1] == "{"]
        return [e for e in entries if event is None or e["event"] == event]

    def started(self) -> list[tuple[int, int]]:
        """(index, pid) of every child the supervisor started, in order."""
        return [(e["index"], e["pid"]) for e in self.logs("worker process started")]

    def current_children(self) -> dict[int, int]:
        """The pid of the newest child of each slot."""
        return dict(self.started())

    def steps(self, phase: str | None = None) -> list[Step]:
        steps = [Step(**json.loads(line)) for line in read_lines(self.log)]
        return [s for s in steps if phase is None or s.phase == phase]

    def wait_ready(self, count: int) -> None:
        """Wait until `count` children have logged that they subscribed."""
        wait_for(
            lambda: len(self.logs("worker started")) >= count or self.proc.poll() is not None,
            STARTUP,
            f"{count} worker processes to start",
        )
        assert self.proc.poll() is None, self.stderr

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Wait for the supervisor to exit; return its status and how long that took."""
        start = time.monotonic()
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor still running {timeout} s later; stderr:\n{self.stderr}"
            ) from None
        return status, time.monotonic() - start

    def kill_all(self) -> None:
        """Kill the supervisor and any child it left behind (only after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for _, pid in self.started():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@dataclass
class Bus:
    """The test's topic on the session's Redis."""

    url: str
    topic: str
    client: redis.Redis

    def publish(self, payloads: Sequence[dict[str, Any]]) -> list[str]:
        async def go() -> list[str]:
            async with App("publisher", broker=RedisBroker(self.url)) as app:
                return await app.publish_many([(self.topic, p) for p in payloads])

        return anyio.run(go)

    def pending(self, group: str = "work") -> int:
        return int(self.client.xpending(f"omni:{{{self.topic}}}:stream", group)["pending"])


@pytest.fixture
def bus(redis_url: str) -> Iterator[Bus]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield Bus(redis_url, f"t{uuid4().hex[:12]}.jobs", client)
    finally:
        client.close()


@pytest.fixture
def supervise(bus: Bus, tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """A factory of supervisors on the test's topic; any still running are killed afterwards."""
    started: list[Supervised] = []

    def start(
        processes: int, *args: str, app: str = APP, cli: bool = True, **env: str
    ) -> Supervised:
        full_env = cli_env(
            OMNIDAEMON_BROKER_URL=bus.url,
            T_TOPIC=bus.topic,
            T_LOG=str(tmp_path / "handlers.log"),
            T_RESTART_INITIAL="0.1",
            **env,
        )
        supervised = Supervised(processes, app, args, full_env, cli=cli)
        started.append(supervised)
        return supervised

    try:
        yield start
    finally:
        for supervised in started:
            supervised.kill_all()


def test_runs_n_workers_and_stops_them_all_gracefully_on_sigterm(
    supervise: Callable[..., Supervised], bus: Bus
) -> None:
    # One event at a time per child, each taking a while: both children must take some.
    sup = supervise(2, T_CONCURRENCY="1", T_SLEEP="0.1")
    sup.wait_ready(2)
    children = sup.current_children()
    assert sorted(children) == [0, 1] and len(set(children.values())) == 2, sup.stderr
    keys = [f"e{i}" for i in range(10)]
    bus.publish([{"k": k} for k in keys])
    wait_for(
        lambda: len(sup.steps("done")) == 10 and bus.pending() == 0,
        SETTLE,
        "every event to be handled",
    )

    done = sup.steps("done")
    assert sorted(s.key for s in done) == sorted(keys)
    assert {(s.index, s.pid) for s in done} == {(str(i), pid) for i, pid in children.items()}, (
        "both children handled events, each with its slot's OMNIDAEMON_WORKER_INDEX"
    )

    sup.send(signal.SIGTERM)
    status, took = sup.wait_exit(timeout=10)

    assert status == 0, sup.stderr
    assert took < 5
    assert not any(alive(pid) for pid in children.values())
    assert len(sup.logs("worker stopped")) == 2, "each child stopped gracefully"
    stopped = sup.logs("worker process stopped")
    assert sorted((e["index"], e["pid"], e["exit_code"]) for e in stopped) == [
        (0, children[0], 0),
        (1, children[1], 0),
    ]
    assert sup.started() == list(children.items()), "nothing was restarted"
    assert [e for e in sup.logs() if e["level"] in ("warning", "error")] == []


def test_a_child_killed_mid_handler_is_replaced_and_its_event_is_completed(
    supervise: Callable[..., Supervised], bus: Bus
) -> None:
    sup = supervise(2)
    sup.wait_ready(2)
    before = sup.current_children()
    keys = [f"e{i}" for i in range(6)]
    bus.publish([{"k": "blocked", "block": True}, *({"k": k} for k in keys)])
    blocked = wait_for(
        lambda: [s for s in sup.steps("start") if s.key == "blocked"],
        SETTLE,
        "the blocking handler to start",
    )[0]
    victim = blocked.pid
    index = next(i for i, pid in before.items() if pid == victim)
    # Everything else was handled and acknowledged: only the blocked event is in flight.
    wait_for(
        lambda: len(sup.steps("done")) == len(keys) and bus.pending() == 1,
        SETTLE,
        "the other events to be handled",
    )

    os.kill(victim, signal.SIGKILL)

    died = wait_for(
        lambda: [e for e in sup.logs("worker process exited; restarting it") if e["pid"] == victim],
        SETTLE,
        "the supervisor to notice the death",
    )
    assert len(died) == 1
    assert died[0]["level"] == "warning"
    assert (died[0]["index"], died[0]["signal"]) == (index, "SIGKILL")
    assert died[0]["restart_in"] == pytest.approx(0.5)  # the command line's first delay
    wait_for(lambda: len(sup.started()) == 3, SETTLE, "a replacement to be started")
    replacement = sup.current_children()[index]
    assert replacement != victim
    wait_for(
        lambda: [s for s in sup.steps("done") if s.key == "blocked"] and bus.pending() == 0,
        SETTLE,
        "the killed child's event to be reclaimed and completed",
    )

    finished = [s for s in sup.steps("done") if s.key == "blocked"]
    assert len(finished) == 1
    assert finished[0].pid != victim and finished[0].attempt == 2, "a reclaimed delivery"
    assert sorted(s.key for s in sup.steps("done")) == sorted(["blocked", *keys])
    assert sup.proc.poll() is None
    children = sup.current_children()
    assert children == {**before, index: replacement}
    assert not alive(victim)
    assert all(alive(pid) for pid in children.values()), "the supervisor still runs 2 children"

    sup.send(signal.SIGTERM)
    status, _ = sup.wait_exit(timeout=10)
    assert status == 0, sup.stderr
    assert not any(alive(pid) for pid in children.values())


def test_a_bad_app_path_makes_it_give_up_with_status_2(
    supervise: Callable[..., Supervised],
) -> None:
    sup = supervise(2, app="tests.worker.no_such_module:app")

    status, took = sup.wait_exit(timeout=30)

    assert status == 2, sup.stderr
    # Two Pythons that fail to import, and no backoff: seconds, even on a loaded machine
    # (10.4 s in one CI run, with the suite's heaviest tests alongside); restarts would show
    # as more than two starts.
    assert took < 20
    assert len(sup.started()) == 2, "not restarted"
    problems = [e for e in sup.logs() if e["level"] in ("warning", "error")]
    assert sorted(e["index"] for e in problems) == [0, 1], sup.stderr
    assert all(e["level"] == "error" for e in problems)
    assert all("configuration error" in e["event"] for e in problems)
    assert "no worker process is left" in problems[-1]["event"]
    assert sup.stderr.count("cannot import 'tests.worker.no_such_module'") == 2


def test_a_second_signal_exits_at_once_even_with_a_handler_blocked(
    supervise: Callable[..., Supervised], bus: Bus
) -> None:
    sup = supervise(2)
    sup.wait_ready(2)
    children = sup.current_children()
    bus.publish([{"k": "blocked", "block": True}])
    busy = wait_for(lambda: sup.steps("start"), SETTLE, "the blocking handler to start")[0].pid
    idle = next(pid for pid in children.values() if pid != busy)

    sup.send(signal.SIGINT)
    # The idle child stops at once; the busy one waits for its handler (30 s of grace).
    wait_for(
        lambda: [e for e in sup.logs("worker process stopped") if e["pid"] == idle],
        SETTLE,
        "the idle child to stop",
    )
    assert alive(busy) and sup.proc.poll() is None
    sup.send(signal.SIGINT)
    status, took = sup.wait_exit(timeout=10)

    assert status == 128 + signal.SIGINT, sup.stderr
    assert took < 3
    assert not alive(busy)
    assert len(sup.logs("exiting now: workers abandon their in-flight handlers")) == 1
    assert sup.steps("done") == [], "the blocked handler was abandoned"
    assert len(sup.started()) == 2, "nothing was restarted during the stop"


# In-process: the supervisor's own rules, with tiny `python -c` children -------------------

PY = sys.executable
SLEEPER = "import time; time.sleep(60)"


def child(code: str) -> Callable[[int], list[str]]:
    return lambda index: [PY, "-c", code]


def ready_child(ready_dir: Path, on_sigterm: str) -> Callable[[int], list[str]]:
    """A child that sets `on_sigterm` as its SIGTERM handler, then says so by making a file."""
    code = (
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, {on_sigterm})\n"
        f"open(os.path.join({str(ready_dir)!r}, str(os.getpid())), 'w').close()\n"
        "time.sleep(60)\n"
    )
    return child(code)


def files(directory: Path) -> dict[str, str]:
    """The files of `directory` (name to text), but those still being written (`.tmp`)."""
    return {p.name: p.read_text() for p in directory.iterdir() if p.suffix != ".tmp"}


def gone(pid: int) -> bool:
    """True once `pid` was reaped (the supervisor under test is its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `predicate` on the event loop until it returns something truthy (returned)."""
    with anyio.fail_after(timeout):
        while not (value := predicate()):
            await anyio.sleep(0.01)
        return value


def events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.anyio
async def test_stop_forwards_sigterm_and_children_get_their_index_and_env(tmp_path: Path) -> None:
    code = (
        "import os, sys, time\n"
        "index = os.environ['OMNIDAEMON_WORKER_INDEX']\n"
        # Written aside and renamed: the file appears with its content, so a SIGTERM sent
        # as soon as all three exist cannot catch a child between creating and writing it.
        f"path = os.path.join({str(tmp_path)!r}, index)\n"
        "with open(path + '.tmp', 'w') as f:\n"
        "    f.write(os.environ['T_EXTRA'])\n"
        "os.rename(path + '.tmp', path)\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor(child(code), 3, env={"T_EXTRA": "extra"})
    status: list[int] = []

    async def run() -> None:
        status.append(await sup.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await until(lambda: len(files(tmp_path)) == 3)
        pids = sup.children
        sup.stop()

    # Killed by the forwarded SIGTERM itself (no handler installed): a clean stop.
    assert status == [0]
    assert files(tmp_path) == {"0": "extra", "1": "extra", "2": "extra"}
    assert sorted(pids) == [0, 1, 2]
    assert sup.children == {}
    assert all(gone(pid) for pid in pids.values())


@pytest.mark.anyio
async def test_restart_backoff_doubles_up_to_its_cap_and_resets_after_a_long_run() -> None:
    for reset_after, expected in ((60.0, [0.01, 0.02, 0.04, 0.04]), (0.0, [0.01] * 4)):
        sup = Supervisor(
            child("raise SystemExit(1)"),
            1,
            restart_backoff=Backoff(initial=0.01, maximum=0.04, jitter=False),
            restart_reset_after=reset_after,
        )
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sup.run)
                await until(lambda: len(events(logs, "worker process exited; restarting it")) >= 4)
                sup.stop()

        restarts = events(logs, "worker process exited; restarting it")
        assert [e["restart_in"] for e in restarts[:4]] == expected
        assert all((e["index"], e["exit_code"]) == (0, 1) for e in restarts)
        assert all(e["log_level"] == "warning" for e in restarts)


@pytest.mark.anyio
async def test_a_child_exiting_with_status_2_is_not_restarted_even_late() -> None:
    # Slot 0 fails with a configuration error after a while (as a worker that waited for the
    # bus and then had its password refused does); slot 1 keeps running. The same command
    # would fail again, so slot 0 stays empty instead of crash-looping.
    sup = Supervisor(
        lambda index: (
            [PY, "-c", "import time; time.sleep(0.3); raise SystemExit(2)"]
            if index == 0
            else [PY, "-c", SLEEPER]
        ),
        2,
        restart_backoff=Backoff(initial=0.05, jitter=False),
    )
    status: list[int] = []

    async def run() -> None:
        status.append(await sup.run())

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            gave_up = await until(lambda: [e for e in logs if "not restarting it" in e["event"]])
            await until(lambda: list(sup.children) == [1])
            sup.stop()

    assert status == [0]
    assert [e["index"] for e in gave_up] == [0]
    assert events(logs, "worker process exited; restarting it") == []
    assert len(events(logs, "worker process started")) == 2


@pytest.mark.anyio
async def test_a_given_up_childs_command_line_is_logged_without_broker_credentials() -> None:
    # `omnidaemon worker --broker URL --processes N` passes the URL on to its children.
    urls = ["--broker", "nats://s3cret-token@h:4222", "--broker=redis://:hunter2@h:6379/0"]
    sup = Supervisor(lambda index: [PY, "-c", "raise SystemExit(2)", *urls], 1)
    with capture_logs() as logs:
        assert await sup.run() == 2
    [gave_up] = [e for e in logs if "not restarting it" in e["event"]]
    assert gave_up["argv"][-3:] == [
        "--broker",
        "nats://***@h:4222",
        "--broker=redis://:***@h:6379/0",
    ]
    assert "s3cret-token" not in repr(logs) and "hunter2" not in repr(logs)


@pytest.mark.anyio
async def test_children_that_outlive_the_grace_are_killed_and_the_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "_GRACE_MARGIN", 0.1)
    sup = Supervisor(
        lambda index: ready_child(
            tmp_path, "signal.SIG_IGN" if index == 0 else "lambda *a: sys.exit(3)"
        )(index),
        2,
        shutdown_grace=0.2,
    )
    status: list[int] = []

    async def run() -> None:
        status.append(await sup.run())

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await until(lambda: len(files(tmp_path)) == 2)
            pids = sup.children
            sup.stop()

    assert status == [1]
    assert len(events(logs, "killing worker processes that did not stop in time")) == 1
    failed = {e["index"]: e for e in events(logs, "worker process failed while stopping")}
    assert failed[0]["signal"] == "SIGKILL"
    assert failed[1]["exit_code"] == 3
    assert all(gone(pid) for pid in pids.values())


@pytest.mark.anyio
async def test_a_cancelled_supervisor_leaves_no_orphans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "_HARD_STOP_KILL_AFTER", 0.2)
    # Slot 0 ignores SIGTERM, so only the SIGKILL that follows ends it.
    sup = Supervisor(
        lambda index: ready_child(tmp_path, "signal.SIG_IGN" if index == 0 else "signal.SIG_DFL")(
            index
        ),
        2,
    )
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.run)
            await until(lambda: len(files(tmp_path)) == 2)
            pids = sup.children
            tg.cancel_scope.cancel()

    assert all(gone(pid) for pid in pids.values())
    assert sup.children == {}
    assert len(events(logs, "terminating worker processes")) == 1
