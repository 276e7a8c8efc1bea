"""A clean bus per compat test (Redis, and a Redis Cluster): the seed's samples reuse topic
names across tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from omnidaemon.compat import OmniDaemonSDK
from tests.http_receiver import Receiver, serving


@pytest.fixture(params=["redis", "cluster"])
def compat_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An emptied bus selected the way OmniDaemon users do: the session's Redis (database 9),
    or the session's Redis Cluster (every master flushed; topics are reused across tests)."""
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
    monkeypatch.delenv("OMNIDAEMON_BROKER_URL", raising=False)
    monkeypatch.setenv("OMNIDAEMON_HEARTBEAT_INTERVAL", "0.2")
    return url


@pytest.fixture
async def sdk(compat_url: str) -> AsyncIterator[OmniDaemonSDK]:
    """An SDK on the test's database, shut down after the test."""
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
