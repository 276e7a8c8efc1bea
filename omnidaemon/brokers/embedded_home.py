"""Where the embedded bus lives, and whether what is there may be trusted.

The embedded server's home directory holds its socket, its data and the files that decide which
process is the server. Whoever can write in it can plant a socket that receives every event, or
data the server loads on its next start; so the home must be the user's own and closed to
group and others, and each file we rely on must be the user's own and of the expected kind.
`check_home` verifies all of that and is the one gate every lookup of a home goes through
(starting, status, stopping), wherever the home was found.

Which home: `find_home` looks the way git looks for a repository. `$OMNIDAEMON_HOME` if set;
else the nearest `.omnidaemon/` in the current folder or one of its parents, so a worker in a
project and a publisher in any subfolder of it share one bus; else the per-user default
`~/.omnidaemon`, so commands run outside any project share one bus too, wherever they run.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from omnidaemon.errors import ConfigurationError

__all__ = [
    "HOME_NAME",
    "PRIVATE_UMASK",
    "ChosenHome",
    "UnsafeEmbeddedHome",
    "check_home",
    "default_home",
    "find_home",
    "make_home",
]

HOME_NAME = ".omnidaemon"
"""The name of a bus's folder, in a project or in the user's home directory."""

PRIVATE_UMASK = 0o077
"""The umask the server runs under: its data, pid file and log are readable by the user only."""

# sun_path holds 108 bytes on Linux and 104 on macOS, including the terminating NUL.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107

# Write access for anyone but the owner: enough to plant or replace a file in the directory.
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafeEmbeddedHome(ConfigurationError):
    """The embedded bus's home, or a file in it, could be someone else's; the message says which.

    Nothing is started in, read from or connected to such a home.
    """


@dataclass(frozen=True, slots=True)
class ChosenHome:
    """The embedded bus a command uses, and why that one.

    Attributes:
        path: The bus's folder, absolute.
        source: `env` (`$OMNIDAEMON_HOME`), `found` (a `.omnidaemon/` in the current folder or
            a parent) or `user` (the per-user default, `~/.omnidaemon`).
        reason: The same in words, for `bus status` and the notice of a new bus.
    """

    path: Path
    source: Literal["env", "found", "user"]
    reason: str


def find_home(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> ChosenHome:
    """Which embedded bus a command run in `cwd` (default: the current folder) uses.

    `$OMNIDAEMON_HOME` if set; else the nearest `.omnidaemon` in `cwd` or a parent; else
    `~/.omnidaemon`. Looking creates nothing. Whatever is found still goes through
    `check_home` before it is used: a `.omnidaemon` another user planted in a parent folder
    (in `/tmp`, say) is refused, not trusted.
    """
    env = os.environ if env is None else env
    forced = env.get("OMNIDAEMON_HOME")
    if forced:
        return ChosenHome(Path(forced).expanduser().resolve(), "env", "OMNIDAEMON_HOME is set")
    user = _user_home(env)
    here = (Path.cwd() if cwd is None else cwd).resolve()
    for folder in (here, *here.parents):
        candidate = folder / HOME_NAME
        if candidate == user:
            break  # walking up from inside the home directory: that is the per-user default
        # lexists, not is_dir: a link or a file there is reported by `check_home`, not skipped
        # in favour of another bus, which would be the silent split this lookup prevents.
        if os.path.lexists(candidate):
            where = "this folder" if folder == here else f"a parent folder, {folder}"
            return ChosenHome(candidate, "found", f"found in {where}")
    return ChosenHome(
        user, "user", f"the per-user default: no {HOME_NAME}/ in this folder or its parents"
    )


def _user_home(env: Mapping[str, str]) -> Path:
    base = env.get("HOME") or os.path.expanduser("~")
    return (Path(base) / HOME_NAME).resolve()


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """The embedded bus's folder a command run here uses (`find_home(env).path`)."""
    return find_home(env).path


def make_home(home: Path) -> bool:
    """Create `home` private to the user, with a `.gitignore` so a project never commits it.

    Returns False (and changes nothing) when it exists already.
    """
    home.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        return False
    # `*` ignores the .gitignore too: the folder stays out of `git status` altogether.
    fd = os.open(home / ".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as ignore:
        ignore.write("# The embedded bus of omnidaemon: its socket and data.\n*\n")
    return True


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
    def data(self) -> Path:
        return self.home / "appendonlydir"

    @property
    def url(self) -> str:
        return "unix://" + quote(str(self.sock))


def check_home(files: _Files) -> None:
    """Refuse a home, or a file in it, that someone other than this user could have put there.

    The home must be a directory owned by this user and writable by nobody else. Each file the
    bus relies on, where it exists, must be this user's own and of its kind: the socket a socket
    (not a link to one), the pid file, lock, config and log regular files, the data a
    directory. A missing home passes: it is created private when needed.

    Raises:
        UnsafeEmbeddedHome: what is wrong, and what to do about it.
    """
    if os.name != "posix":
        return  # no embedded server runs there (`find_server_binary` says so)
    try:
        home = files.home.lstat()
    except FileNotFoundError:
        return
    _check_entry(files.home, home, stat.S_ISDIR, "a directory")
    if home.st_mode & _SHARED_WRITE:
        raise UnsafeEmbeddedHome(
            f"the embedded bus directory {files.home} is writable by other users (mode "
            f"{stat.S_IMODE(home.st_mode):o}), who could plant a server or data in it: check its "
            "files and 'chmod 700' it, or set OMNIDAEMON_HOME to a private directory"
        )
    for path, is_kind, kind in (
        (files.sock, stat.S_ISSOCK, "a socket"),
        (files.pid, stat.S_ISREG, "a regular file"),
        (files.lock, stat.S_ISREG, "a regular file"),
        (files.conf, stat.S_ISREG, "a regular file"),
        (files.log, stat.S_ISREG, "a regular file"),
        (files.data, stat.S_ISDIR, "a directory"),
    ):
        try:
            entry = path.lstat()
        except FileNotFoundError:
            continue
        _check_entry(path, entry, is_kind, kind)
        if stat.S_ISDIR(entry.st_mode) and entry.st_mode & _SHARED_WRITE:
            raise UnsafeEmbeddedHome(
                f"the embedded bus data directory {path} is writable by other users: check its "
                "files and 'chmod 700' it"
            )


def _check_entry(
    path: Path, entry: os.stat_result, is_kind: Callable[[int], bool], kind: str
) -> None:
    # Given lstat's result, not stat's: a link could point anywhere, another user's socket too.
    if not is_kind(entry.st_mode):
        raise UnsafeEmbeddedHome(
            f"{path} is not {kind}: the embedded bus does not use it; remove it if you did "
            "not put it there, or set OMNIDAEMON_HOME to another directory"
        )
    if entry.st_uid != os.geteuid():
        raise UnsafeEmbeddedHome(
            f"{path} belongs to uid {entry.st_uid}, not to you (uid {os.geteuid()}): the "
            "embedded bus does not trust it; remove it if you did not put it there, or set "
            "OMNIDAEMON_HOME to a directory of your own"
        )
