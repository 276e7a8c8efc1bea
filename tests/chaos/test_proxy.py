"""The chaos proxy, through a real redis-server: what a client of the proxy would notice."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.chaos.proxy import ChaosProxy
from tests.servers import RedisServer

Connect = Callable[..., redis.Redis]


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[ChaosProxy]:
    with ChaosProxy("127.0.0.1", redis_server.port) as chaos:
        yield chaos


@pytest.fixture
def direct(redis_url: str) -> Iterator[redis.Redis]:
    """A client straight to the server, to see what reached it."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


def _client(url: str, *, timeout: float = 5.0, name: str | None = None) -> redis.Redis:
    # No retries: redis-py would otherwise reconnect (with backoff) and hide the failure.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        client_name=name,
    )


@pytest.fixture
def connect(proxy: ChaosProxy) -> Iterator[Connect]:
    """Make clients through the proxy; closed at the end of the test."""
    clients: list[redis.Redis] = []

    def make(*, timeout: float = 5.0, name: str | None = None) -> redis.Redis:
        client = _client(proxy.url, timeout=timeout, name=name)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _key() -> str:
    return f"chaos:{uuid.uuid4().hex}"


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _round_trip(client: redis.Redis) -> float:
    started = time.perf_counter()
    assert client.ping()
    return time.perf_counter() - started


def _open_sockets() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        # The directory's own descriptor is gone by the time it is read.
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


# Pass-through ---------------------------------------------------------------------------------


def test_commands_pass_through_unchanged(proxy: ChaosProxy, connect: Connect) -> None:
    client = connect()
    key = _key()
    assert proxy.state == "normal"
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"

    assert client.set(key, b"value")
    assert client.get(key) == b"value"

    big = os.urandom(5 * 1024 * 1024)
    assert client.set(key, big)
    assert client.get(key) == big

    pipe = client.pipeline(transaction=False)
    for i in range(1000):
        pipe.rpush(f"{key}:list", i)
    assert pipe.execute() == list(range(1, 1001))
    assert client.lrange(f"{key}:list", 0, -1) == [str(i).encode() for i in range(1000)]

    assert proxy.connections_total == 1
    assert proxy.connections_open == 1


# Pause ----------------------------------------------------------------------------------------


def test_pause_holds_commands_until_resume(
    proxy: ChaosProxy, connect: Connect, direct: redis.Redis
) -> None:
    client = connect()
    key = _key()
    assert client.set(key, b"before")

    proxy.pause()
    assert proxy.state == "paused"
    with ThreadPoolExecutor(3) as pool:
        read = pool.submit(client.get, key)
        with pytest.raises(TimeoutError):
            read.result(timeout=0.5)

        # A new connection is accepted, and held like the others: its write reaches no one.
        writer = connect()
        write = pool.submit(writer.set, key, b"during")
        with pytest.raises(TimeoutError):
            write.result(timeout=0.2)
        assert direct.get(key) == b"before"
        assert proxy.connections_open == 2

        proxy.resume()
        assert proxy.state == "normal"
        assert read.result(timeout=5) == b"before"
        assert write.result(timeout=5) is True
    assert direct.get(key) == b"during"


def test_bytes_held_by_a_pause_flow_in_order(proxy: ChaosProxy, connect: Connect) -> None:
    client = connect()
    key = _key()
    assert client.ping()
    big = os.urandom(1024 * 1024)

    def pipeline() -> list[object]:
        pipe = client.pipeline(transaction=False)
        for i in range(500):
            pipe.rpush(key, i)
        pipe.set(f"{key}:big", big)
        pipe.get(f"{key}:big")
        for i in range(500, 1000):
            pipe.rpush(key, i)
        return pipe.execute()

    proxy.pause()
    with ThreadPoolExecutor(1) as pool:
        replies = pool.submit(pipeline)
        with pytest.raises(TimeoutError):
            replies.result(timeout=0.3)
        proxy.resume()
        assert replies.result(timeout=5) == [
            *range(1, 501),
            True,
            big,
            *range(501, 1001),
        ]
    assert client.lrange(key, 0, -1) == [str(i).encode() for i in range(1000)]


# Cut ------------------------------------------------------------------------------------------


def test_cut_resets_connections_and_refuses_new_ones_until_resume(
    proxy: ChaosProxy, connect: Connect, direct: redis.Redis
) -> None:
    name = f"chaos-{uuid.uuid4().hex[:12]}"
    client = connect(name=name)
    assert client.ping()
    assert name in {c["name"] for c in direct.client_list()}

    proxy.cut()
    assert proxy.state == "cut"
    assert proxy.connections_open == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()
    # The server's side of the connection is gone too.
    _wait_for(lambda: name not in {c["name"] for c in direct.client_list()})

    total = proxy.connections_total
    with pytest.raises(redis.ConnectionError):
        connect().ping()
    assert proxy.connections_total == total + 1
    assert proxy.connections_open == 0

    proxy.resume()
    assert proxy.state == "normal"
    key = _key()
    fresh = connect()
    assert fresh.set(key, b"after")
    assert fresh.get(key) == b"after"


def test_cut_while_paused_drops_the_held_connections(proxy: ChaosProxy, connect: Connect) -> None:
    client = connect()
    assert client.ping()
    proxy.pause()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.ping)
        with pytest.raises(TimeoutError):
            pending.result(timeout=0.2)
        proxy.cut()
        with pytest.raises(redis.ConnectionError):
            pending.result(timeout=5)
    proxy.resume()
    assert connect().ping()


# Slow -----------------------------------------------------------------------------------------


def test_slow_adds_latency_until_resume(proxy: ChaosProxy, connect: Connect) -> None:
    client = connect()
    key = _key()
    assert client.ping()
    assert _round_trip(client) < 0.2

    proxy.slow(0.2)
    assert proxy.state == "slow"
    assert proxy.delay == 0.2
    assert _round_trip(client) >= 0.2
    # Latency, not a bandwidth cap: a pipeline pays the delay once (each way), in order.
    pipe = client.pipeline(transaction=False)
    for _ in range(200):
        pipe.incr(key)
    started = time.perf_counter()
    assert pipe.execute() == list(range(1, 201))
    assert 0.2 <= time.perf_counter() - started < 2

    proxy.resume()
    assert proxy.state == "normal"
    assert _round_trip(client) < 0.2

    proxy.slow(0.2)
    proxy.slow(0)
    assert proxy.state == "normal"
    assert _round_trip(client) < 0.2


def test_slow_rejects_a_negative_delay(proxy: ChaosProxy) -> None:
    with pytest.raises(ValueError, match="delay"):
        proxy.slow(-1)
    assert proxy.state == "normal"


# Lifecycle ------------------------------------------------------------------------------------


def test_stop_closes_every_connection_and_ends_the_thread(redis_server: RedisServer) -> None:
    sockets_before = _open_sockets()
    chaos = ChaosProxy("127.0.0.1", redis_server.port)
    chaos.start()
    thread_name = f"chaos-proxy:{chaos.port}"
    assert thread_name in {t.name for t in threading.enumerate()}

    clients = [_client(chaos.url) for _ in range(3)]
    try:
        for client in clients:
            assert client.ping()
        assert chaos.connections_open == 3
        # One of them waits on a held command: stop() must not wait for it.
        chaos.pause()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(clients[0].ping)
            with pytest.raises(TimeoutError):
                pending.result(timeout=0.1)
            chaos.stop()
            with pytest.raises(redis.ConnectionError):
                pending.result(timeout=5)

        assert chaos.connections_open == 0
        assert thread_name not in {t.name for t in threading.enumerate()}
        chaos.stop()  # idempotent
        with pytest.raises(redis.ConnectionError):
            clients[1].ping()  # nothing listens any more
        with pytest.raises(RuntimeError):
            chaos.pause()
    finally:
        for client in clients:
            client.close()
        chaos.stop()
    assert _open_sockets() == sockets_before


def test_restart_listens_on_the_same_port(redis_server: RedisServer) -> None:
    with ChaosProxy("127.0.0.1", redis_server.port) as chaos:
        port = chaos.port
        client = _client(chaos.url)
        try:
            assert client.ping()
            chaos.cut()
            chaos.stop()
            chaos.start()
            assert chaos.port == port
            assert chaos.state == "normal"
            assert client.ping()  # a new connection, to the same address
        finally:
            client.close()
