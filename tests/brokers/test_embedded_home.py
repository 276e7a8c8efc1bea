"""The embedded bus trusts only a home, socket and files that are the user's own.

Real servers and real sockets in fresh directories under /tmp. CI runs as root, for whom every
permission check passes; so these tests make a home unsafe by its mode (refused whatever the
uid) or hand files to another uid with chown (which only root can do: those tests are skipped
for other users).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis

from omnidaemon import App
from omnidaemon.brokers.embedded import EmbeddedBroker
from omnidaemon.brokers.embedded_home import UnsafeEmbeddedHome, find_home
from omnidaemon.brokers.embedded_server import ensure_server, server_status, stop_server
from omnidaemon.cli import main
from omnidaemon.errors import ConfigurationError
from tests.brokers.test_embedded_server import (
    kill_servers,
    server_processes,
    wait_for,
    written_to_aof,
)

pytestmark = pytest.mark.slow

STRANGER = 65534  # "nobody" on most systems; any uid but ours will do
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another uid")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNIDAEMON_EMBEDDED_SERVER", raising=False)
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    monkeypatch.delenv("OMNIDAEMON_HOME", raising=False)


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh, short, private home directory; whatever a test made of it is undone after."""
    path = Path(tempfile.mkdtemp(prefix="od", dir="/tmp"))
    try:
        yield path
    finally:
        # Give it back to us, private, so that the server (if any) can be stopped.
        for entry in [path, *path.iterdir()] if path.is_dir() else []:
            with contextlib.suppress(OSError):
                os.lchown(entry, os.geteuid(), os.getegid())
        with contextlib.suppress(OSError):
            path.chmod(0o700)
        with contextlib.suppress(Exception):
            stop_server(path, timeout=5)
        kill_servers(path)
        shutil.rmtree(path, ignore_errors=True)


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    code = exited.value.code
    assert isinstance(code, int)
    return code


def assert_refused(home: Path, match: str) -> None:
    """Nothing is started in, or reported from, `home`: every entry point says why, at once."""
    for call in (ensure_server, server_status, stop_server):
        with pytest.raises(UnsafeEmbeddedHome, match=match) as caught:
            call(home)
        assert isinstance(caught.value, ConfigurationError)
    assert server_processes(home) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702], ids=oct)
def test_a_home_others_can_write_to_is_refused(
    home: Path, mode: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home.chmod(mode)
    assert_refused(home, f"{home} is writable by other users")
    assert not (home / "valkey.sock").exists()

    # The command line says so in one line, with the status of configuration errors.
    monkeypatch.setenv("OMNIDAEMON_HOME", str(home))
    capsys.readouterr()
    assert run_cli("publish", "orders", '{"id": 1}') == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("omnidaemon publish: error: the embedded bus directory")
    assert "chmod 700" in err and "OMNIDAEMON_HOME" in err
    assert server_processes(home) == []


@as_root
def test_a_home_owned_by_another_user_is_refused(home: Path) -> None:
    os.chown(home, STRANGER, STRANGER)  # mode 0700: only its owner (and root) can write
    assert_refused(home, f"{home} belongs to uid {STRANGER}, not to you")


@as_root
@pytest.mark.parametrize("name", ["valkey.pid", "valkey.lock", "valkey.conf", "valkey.log"])
def test_a_file_of_another_user_in_the_home_is_refused(home: Path, name: str) -> None:
    (home / name).write_text("12345\n")
    os.chown(home / name, STRANGER, STRANGER)
    assert_refused(home, f"{home / name} belongs to uid {STRANGER}")


@as_root
def test_data_of_another_user_is_not_loaded(home: Path) -> None:
    (home / "appendonlydir").mkdir(mode=0o700)
    os.chown(home / "appendonlydir", STRANGER, STRANGER)
    assert_refused(home, f"{home / 'appendonlydir'} belongs to uid {STRANGER}")


def test_a_log_that_links_elsewhere_is_not_written_through(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    (home / "valkey.log").symlink_to(target)
    assert_refused(home, f"{home / 'valkey.log'} is not a regular file")
    assert target.read_text() == "keep me\n"


# One reply per command, enough for redis-py to take the planted server for a real one.
PLANTED_REPLIES = {b"PING": b"+PONG\r\n", b"HELLO": b"%1\r\n+proto\r\n:3\r\n"}


class PlantedServer:
    """Something else listening on a socket: answers PING like a server, records what it gets."""

    def __init__(self, path: Path) -> None:
        self.received = bytearray()
        self.connections = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                self.received += data
                lines = data.split(b"\r\n")
                names = [
                    lines[i + 2].upper() for i, line in enumerate(lines[:-2]) if line[:1] == b"*"
                ]
                conn.sendall(b"".join(PLANTED_REPLIES.get(name, b"+OK\r\n") for name in names))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.mark.parametrize("planted", ["owned by another user", "a link to another socket"])
def test_a_planted_server_on_the_socket_is_not_trusted_and_receives_nothing(
    home: Path, tmp_path: Path, planted: str
) -> None:
    if planted == "owned by another user":
        if os.geteuid() != 0:
            pytest.skip("only root can give a socket to another uid")
        impostor = PlantedServer(home / "valkey.sock")
        os.chown(home / "valkey.sock", STRANGER, STRANGER)
        match = f"belongs to uid {STRANGER}"
    else:
        impostor = PlantedServer(tmp_path / "elsewhere.sock")
        (home / "valkey.sock").symlink_to(tmp_path / "elsewhere.sock")
        match = "is not a socket"
    try:
        # It does answer PING: only its owner (or kind) gives it away.
        with redis.Redis(unix_socket_path=str(home / "valkey.sock")) as r:
            assert r.ping()
        seen = impostor.connections
        impostor.received.clear()

        app = App("shop", broker=EmbeddedBroker(home))

        async def publish() -> None:
            with pytest.raises(UnsafeEmbeddedHome, match=match):
                await app.publish("orders", {"card": "4111 1111 1111 1111"})

        anyio.run(publish)
        assert_refused(home, match)
        assert impostor.connections == seen
        assert bytes(impostor.received) == b""
    finally:
        impostor.close()


def test_the_home_and_everything_the_server_writes_are_private(home: Path) -> None:
    bus = home / "bus"
    url = ensure_server(bus)
    with redis.Redis.from_url(url, socket_timeout=5) as r:
        r.xadd("omni:orders", {"data": "event-1"})
        wait_for(lambda: written_to_aof(r))
    entries = [bus, *bus.rglob("*")]
    assert any(p.parent.name == "appendonlydir" for p in entries)  # the data is there
    modes = {str(p.relative_to(home)): stat.S_IMODE(p.lstat().st_mode) for p in entries}
    assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}


def test_a_home_others_can_only_read_is_used(home: Path) -> None:
    # Made by the user before the first start (mkdir's usual 0755): nobody else can plant
    # anything in it, and what the server writes in it is private anyway.
    home.chmod(0o755)
    url = ensure_server(home)
    with redis.Redis.from_url(url, socket_timeout=5) as r:
        assert r.ping()
    assert server_status(home)["running"] is True


def test_the_bus_is_found_like_a_git_repository(home: Path) -> None:
    user_home, project = home / "u", home / "u" / "work" / "proj"
    deep = project / "src" / "pkg"
    deep.mkdir(parents=True)
    env = {"HOME": str(user_home)}

    # Nothing anywhere: the per-user default, whatever the folder.
    for folder in (deep, project, home):
        chosen = find_home(env, cwd=folder)
        assert (chosen.path, chosen.source) == (user_home / ".omnidaemon", "user")
    assert chosen.reason == "the per-user default: no .omnidaemon/ in this folder or its parents"

    (project / ".omnidaemon").mkdir()
    assert find_home(env, cwd=deep) == find_home(env, cwd=project / "src")
    chosen = find_home(env, cwd=deep)
    assert (chosen.path, chosen.source) == (project / ".omnidaemon", "found")
    assert chosen.reason == f"found in a parent folder, {project}"
    assert find_home(env, cwd=project).reason == "found in this folder"
    assert find_home(env, cwd=user_home / "work").source == "user"  # above the project

    # The nearest wins; the variable wins over everything, made absolute.
    (deep / ".omnidaemon").mkdir()
    assert find_home(env, cwd=deep).path == deep / ".omnidaemon"
    forced = find_home({**env, "OMNIDAEMON_HOME": "bus/../x"}, cwd=deep)
    assert (forced.path, forced.source) == (Path.cwd().resolve() / "x", "env")
    assert not (user_home / ".omnidaemon").exists()  # looking creates nothing


def test_a_bus_found_in_a_parent_folder_is_checked_as_strictly(home: Path) -> None:
    planted = home / ".omnidaemon"
    planted.mkdir()
    planted.chmod(0o777)  # as a .omnidaemon in /tmp, writable by everyone, would be
    below = home / "project"
    below.mkdir()
    chosen = find_home({"HOME": "/nonexistent"}, cwd=below)
    assert chosen.path == planted
    with pytest.raises(UnsafeEmbeddedHome, match="writable by other users"):
        ensure_server(chosen.path, reason=chosen.reason)
    assert server_processes(planted) == []


def test_a_new_home_ignores_itself_and_an_existing_one_is_left_alone(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = home / "bus"
    ensure_server(bus, reason="the test's own")
    assert (bus / ".gitignore").read_text().splitlines()[-1] == "*"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"omnidaemon: started a new embedded bus in {bus} (the test's own)"
    )
    stop_server(bus)
    ensure_server(bus)  # its data is there: not new, nothing said
    assert "started a new" not in capsys.readouterr().err

    ensure_server(home)  # made by someone else (mkdtemp): not ours to add files to
    assert not (home / ".gitignore").exists()
