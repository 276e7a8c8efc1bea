"""Shared fixtures: asyncio through anyio's plugin, a real Redis server and a real NATS
JetStream server for the session, and Redis Clusters (one shared by the session, and one per
module for tests that break nodes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from omnidaemon.brokers.embedded_server import ensure_server, stop_server
from tests.cluster import RedisCluster, running_cluster
from tests.e2e._support import WorkerProcess, spawn_workers
from tests.nats import NatsServer, running_nats
from tests.servers import RedisServer, running_redis


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Iterator[None]:
    """Leave structlog's configuration as the test found it. `structlog.testing.capture_logs`
    ends by *configuring* structlog (with its default logger, printing to standard output),
    so after it every omnidaemon line of the process went to stdout, and a later test reading
    a command's JSON output from stdout read log lines too (seen once in CI, by test order)."""
    configured, config = structlog.is_configured(), structlog.get_config()
    yield
    if configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, shared by the session (tests use unique keys)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A JetStream nats-server on free loopback ports, shared by the session (one per pytest
    worker process, started on first use; tests use unique topics, as on `redis_server`)."""
    with running_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def durable_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own, its JetStream store kept across `restart()`."""
    with running_nats(tmp_path / "nats") as server:
        yield server


@pytest.fixture(scope="session")
def embedded_home() -> Iterator[Path]:
    """The home of an embedded Valkey server shared by the session, stopped at its end.

    Made under /tmp with a short name: a unix socket path must stay under ~107 bytes.
    """
    home = Path(tempfile.mkdtemp(prefix="od"))
    ensure_server(home)
    try:
        yield home
    finally:
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with AOF on (`appendfsync always`), to restart."""
    with running_redis(tmp_path, appendonly=True) as server:
        yield server


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters and no replicas, shared by the session (one per pytest
    worker process, started on first use): for tests that run the broker on a cluster and
    leave its nodes alone. Without replicas it starts in about 2 s, three times faster.

    Tests use unique keys, as on `redis_server`. A test that kills or moves anything takes
    `redis_cluster` instead.
    """
    with running_cluster(tmp_path_factory.mktemp("shared-cluster"), replicas=False) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_url(shared_cluster: RedisCluster) -> str:
    """A seed URL of `shared_cluster` (one node: the broker discovers the others)."""
    return shared_cluster.url


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster (3 masters, a replica each) for one test module, started on first use.

    Module-scoped, not session-scoped: tests kill nodes and move slots, so a module gets a
    cluster whose faults are its own. Tests should find nodes with `master_of(key)`.
    """
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def spawn() -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `omnidaemon worker` processes (`spawn(args, cwd, env)`); kills any left running
    when the test ends."""
    yield from spawn_workers()
