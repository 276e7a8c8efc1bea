"""A clean Redis database per compat test: the seed's samples reuse topic names across tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from omnidaemon.compat import OmniDaemonSDK


@pytest.fixture
def compat_url(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's Redis, database 9, emptied, and selected the way OmniDaemon users do."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
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
