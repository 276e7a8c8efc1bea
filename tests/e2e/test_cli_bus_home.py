"""Which embedded bus a command uses, wherever it runs: the commands run in the test process
(`tests/e2e/_in_process.py`, with the folder and environment a subprocess would get), workers
and bus servers are real processes.

Each test gets its own temporary `HOME`, so the per-user default (`~/.omnidaemon`) is its own,
and works in folders inside it: looking up from there stops at that home, so no `.omnidaemon`
left in /tmp by anyone else is found. Every server a test starts is stopped after it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from omnidaemon.brokers.embedded_process import _pid_alive
from omnidaemon.brokers.embedded_server import server_status, stop_server
from tests.e2e._in_process import run_in_process
from tests.e2e._support import WorkerProcess, cli_env, wait_for

pytestmark = pytest.mark.slow

APP = """
from omnidaemon import App

app = App("greeter")


@app.agent("greeting.requested")
async def greet(event: dict) -> dict:
    return {"text": "Hello, " + event["name"] + "!"}
"""


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh `HOME` (short: the socket path has a size limit); its buses are stopped after."""
    path = Path(tempfile.mkdtemp(prefix="odh", dir="/tmp"))
    try:
        yield path
    finally:
        for bus in path.glob("**/.omnidaemon"):
            stop_server(bus)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    """No broker URL and no OMNIDAEMON_HOME: the bus is found from the folder a command runs in."""
    found = cli_env(HOME=str(home))
    del found["OMNIDAEMON_BROKER_URL"]
    return found


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_with_bus(home: Path) -> Path:
    """A project folder holding its own bus folder, made as a user would, without omnidaemon."""
    project = folder(home / "proj")
    (project / ".omnidaemon").mkdir(mode=0o700)
    return project


def start_worker(
    spawn: Callable[..., WorkerProcess], project: Path, env: dict[str, str]
) -> WorkerProcess:
    (project / "greeter.py").write_text(APP)
    worker = spawn(["greeter:app"], project, env)
    wait_for(lambda: worker.has_logged("worker started"), 20, "the worker to start")
    return worker


@pytest.mark.parametrize("bus", ["project", "per-user"])
def test_a_publisher_in_a_subfolder_reaches_the_worker_of_its_project(
    home: Path, env: dict[str, str], spawn: Callable[..., WorkerProcess], bus: str
) -> None:
    project = project_with_bus(home) if bus == "project" else folder(home / "proj")
    expected = project / ".omnidaemon" if bus == "project" else home / ".omnidaemon"
    why = "found in this folder" if bus == "project" else "the per-user default: no "
    worker = start_worker(spawn, project, env)

    deeper = folder(project / "src" / "tools")
    done = run_in_process(
        ["publish", "greeting.requested", '{"name": "Ada"}', "--wait", "--timeout", "10"],
        deeper,
        env,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"text": "Hello, Ada!"}
    assert "started a new embedded bus" not in done.stderr  # the worker's bus, not a second
    lines = worker.stderr.splitlines()
    # The worker started the new bus, said which and why, and the publisher found it.
    announced = f"omnidaemon: started a new embedded bus in {expected} ({why}"
    assert [line for line in lines if line.startswith(announced)] != []
    started = [orjson.loads(line) for line in lines if "worker started" in line]
    assert started[0]["broker"] == f"embedded://{expected}"
    assert not (deeper / ".omnidaemon").exists()
    assert (home / ".omnidaemon").exists() is (bus == "per-user")


def test_outside_any_project_the_per_user_bus_is_used_and_a_new_one_is_announced(
    home: Path, env: dict[str, str]
) -> None:
    first = run_in_process(["publish", "orders", '{"id": 1}'], folder(home / "a"), env)
    assert first.returncode == 0, first.stderr
    announced = [line for line in first.stderr.splitlines() if line.startswith("omnidaemon: ")]
    assert announced == [
        f"omnidaemon: started a new embedded bus in {home}/.omnidaemon (the per-user default: "
        "no .omnidaemon/ in this folder or its parents)"
    ]

    # From another folder: the same bus, already running, so nothing to announce.
    second = run_in_process(["publish", "orders", '{"id": 2}'], folder(home / "b" / "c"), env)
    assert second.returncode == 0, second.stderr
    assert "started a new embedded bus" not in second.stderr
    listed = run_in_process(["bus", "list", "--json"], folder(home / "d"), env)
    assert [t["length"] for t in orjson.loads(listed.stdout) if t["topic"] == "orders"] == [2]


def test_bus_status_says_which_bus_is_used_and_why(home: Path, env: dict[str, str]) -> None:
    project = project_with_bus(home)
    sub = folder(project / "sub")
    bus = project / ".omnidaemon"

    stopped = run_in_process(["bus", "status"], sub, env)
    assert stopped.returncode == 1
    assert stopped.stdout == (
        f"bus:    {bus}\n"
        f"why:    found in a parent folder, {project}\n"
        "server: not running (a worker or a publisher starts it)\n"
        f"socket: {bus}/valkey.sock\n"
    )
    assert run_in_process(["publish", "t", "{}"], sub, env).returncode == 0
    pid = server_status(bus)["pid"]
    here = run_in_process(["bus", "status"], project, env)
    assert (here.returncode, here.stdout.splitlines()[1:3]) == (
        0,
        ["why:    found in this folder", f"server: runs (pid {pid})"],
    )

    elsewhere = run_in_process(["bus", "status", "--json"], folder(home / "x"), env)
    assert orjson.loads(elsewhere.stdout) == {
        "home": f"{home}/.omnidaemon",
        "source": "user",
        "reason": "the per-user default: no .omnidaemon/ in this folder or its parents",
        "running": False,
        "pid": None,
        "socket": f"{home}/.omnidaemon/valkey.sock",
        "log": f"{home}/.omnidaemon/valkey.log",
        "overridden_by_broker_url": False,
    }
    forced = run_in_process(["bus", "status"], sub, {**env, "OMNIDAEMON_HOME": str(home / "x")})
    assert forced.stdout.splitlines()[:2] == [f"bus:    {home}/x", "why:    OMNIDAEMON_HOME is set"]


def test_bus_ps_lists_a_started_server_and_bus_stop_stops_it(
    home: Path, env: dict[str, str]
) -> None:
    project = project_with_bus(home)
    assert run_in_process(["publish", "t", "{}"], project, env).returncode == 0
    bus = project / ".omnidaemon"
    pid = server_status(bus)["pid"]
    assert pid is not None

    # Other people's servers may run on this machine too: look for ours among them.
    listed = orjson.loads(run_in_process(["bus", "ps", "--json"], home, env).stdout)
    assert {"pid": pid, "home": str(bus), "workers": 0} in listed
    table = run_in_process(["bus", "ps"], home, env).stdout
    assert any(line.split() == [str(pid), "0", str(bus)] for line in table.splitlines())

    # Stopped by its folder, from a folder that would use another bus.
    stopped = run_in_process(["bus", "stop", str(bus)], home, env)
    assert (stopped.returncode, stopped.stdout) == (
        0,
        f"stopped the embedded bus server in {bus}\n",
    )
    assert not _pid_alive(pid)
    listed = orjson.loads(run_in_process(["bus", "ps", "--json"], home, env).stdout)
    assert all(server["home"] != str(bus) for server in listed)


def test_bus_stop_warns_of_live_workers(
    home: Path, env: dict[str, str], spawn: Callable[..., WorkerProcess]
) -> None:
    project = project_with_bus(home)
    worker = start_worker(spawn, project, env)
    bus = str(project / ".omnidaemon")

    def heard() -> bool:
        listed = orjson.loads(run_in_process(["bus", "ps", "--json"], home, env).stdout)
        return {"home": bus, "workers": 1} in [
            {"home": s["home"], "workers": s["workers"]} for s in listed
        ]

    wait_for(heard, 20, "the worker's heartbeat")
    stopped = run_in_process(["bus", "stop"], project, env)
    assert stopped.returncode == 0
    warning = stopped.stderr.splitlines()
    assert len(warning) == 1
    assert warning[0].startswith("omnidaemon bus stop: warning: 1 live worker still uses this bus")
    assert "(greeter)" in warning[0]
    worker.send(signal.SIGKILL)


def test_bus_init_makes_a_private_bus_folder_that_git_ignores(
    home: Path, env: dict[str, str]
) -> None:
    project = folder(home / "proj")
    done = run_in_process(["bus", "init"], project, env)
    bus = project / ".omnidaemon"
    assert done.stdout == f"created {bus}: commands run in {project} or below it use this bus\n"
    assert (bus.stat().st_mode & 0o777) == 0o700
    assert "*" in (bus / ".gitignore").read_text().splitlines()
    again = run_in_process(["bus", "init"], project, env)
    assert again.stdout == f"{bus} exists already: commands run in {project} or below it use it\n"

    # The per-user bus, made by the first command that needs it, ignores itself too.
    assert run_in_process(["publish", "t", "{}"], folder(home / "x"), env).returncode == 0
    assert "*" in (home / ".omnidaemon" / ".gitignore").read_text().splitlines()

    if shutil.which("git") is None:
        return
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(
        [*git, "init", "-q"], cwd=project, check=True, env={**os.environ, "HOME": str(home)}
    )
    assert run_in_process(["publish", "t", "{}"], project, env).returncode == 0  # data, socket, log
    untracked = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=all"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HOME": str(home)},
    ).stdout
    assert ".omnidaemon" not in untracked
