"""A clean bus per compat test (Redis, a Redis Cluster, NATS JetStream): the seed's samples
reuse topic names across tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import anyio
import nats
import pytest
import redis

from omnidaemon.compat import OmniDaemonSDK
from tests.http_receiver import Receiver, serving


def empty_nats(url: str) -> None:
    """Delete every stream the broker keeps on a NATS server (topics, dead letters, values,
    metrics: all on `omni.>` subjects), as FLUSHALL does on Redis."""

    async def wipe() -> None:
        client = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        try:
            js = client.jetstream()
            while True:
                request = json.dumps({"subject": "omni.>"}).encode()
                reply = await client.request("$JS.API.STREAM.NAMES", request, timeout=5)
                names = json.loads(reply.data).get("streams") or []
                if not names:
                    return
                for name in names:
                    await js.delete_stream(name)
        finally:
            await client.close()

    anyio.run(wipe)


@pytest.fixture(params=["redis", "cluster", "nats"])
def compat_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An emptied bus selected the way OmniDaemon users do: the session's Redis (database 9),
    the session's Redis Cluster (every master flushed), or the session's NATS server (every
    stream of the broker deleted); topics are reused across tests."""
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    monkeypatch.setenv("OMNIDAEMON_HEARTBEAT_INTERVAL", "0.2")
    if request.param == "nats":
        url = request.getfixturevalue("nats_url")
        empty_nats(url)
        monkeypatch.setenv("EVENT_BUS_TYPE", "nats")
        monkeypatch.setenv("NATS_URL", url)
        monkeypatch.delenv("REDIS_URL", raising=False)
        return url
    if request.param == "cluster":
        cluster = request.getfixturevalue("shared_cluster")
        for master in cluster.masters():
            cluster.client(master.port).flushall()
        url = cluster.url
    else:
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/9"
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
    monkeypatch.setenv("EVENT_BUS_TYPE", "redis_stream")
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.delenv("NATS_URL", raising=False)
    return url


@pytest.fixture
async def sdk(compat_url: str) -> AsyncIterator[OmniDaemonSDK]:
    """An SDK on the test's bus, shut down after the test."""
    instance = OmniDaemonSDK(shutdown_grace=2.0)
    try:
        yield instance
    finally:
        await instance.shutdown()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A webhook receiver on loopback (which webhooks refuse unless allowed, as here)."""
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", "1")
    with serving() as rec:
        yield rec
