"""`Broker.purge_backlog` (`omnidaemon bus purge TOPIC --keep-groups`), on every broker.

The backlog goes (entries, delayed events, pending deliveries, scheduled retries); the groups,
their dead letters and their place on the topic stay, so the next events reach every agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from uuid import uuid4

import anyio
import pytest

from omnidaemon.brokers import (
    Broker,
    Delivery,
    MemoryBroker,
    RedisBroker,
    Subscription,
    open_broker,
)
from omnidaemon.brokers.base import GroupInfo

pytestmark = pytest.mark.anyio

BROKERS: dict[str, Callable[[pytest.FixtureRequest], Broker]] = {
    "memory": lambda request: MemoryBroker(f"purge-{uuid4().hex}"),
    "redis": lambda request: RedisBroker(request.getfixturevalue("redis_url")),
    "cluster": lambda request: RedisBroker(request.getfixturevalue("cluster_url")),
    "nats": lambda request: open_broker(request.getfixturevalue("nats_url")),
}


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with BROKERS[request.param](request) as b:
        yield b


@pytest.fixture
def topic() -> str:
    return f"purge{uuid4().hex[:10]}.events"


async def fetch_n(broker: Broker, sub: Subscription, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(5):
        while len(got) < n:
            got += await broker.fetch(sub, "c", n - len(got), 0.2)
    return got


async def groups(broker: Broker, topic: str) -> dict[str, GroupInfo]:
    info = await broker.describe(topic)
    assert info is not None
    return {g.group: g for g in info.groups}


async def test_purge_backlog_drops_the_backlog_and_keeps_groups_and_dead_letters(
    broker: Broker, topic: str
) -> None:
    a, b = Subscription(topic, "a"), Subscription(topic, "b")
    await broker.subscribe(a)
    await broker.subscribe(b)
    await broker.publish_many([(topic, f"old{i}".encode()) for i in range(5)])
    await broker.publish(topic, b"old-delayed", delay=60)
    first, second, third = await fetch_n(broker, a, 3)
    assert await broker.retry(a, first, 60.0)  # a scheduled retry
    assert await broker.dead_letter(a, second, b"record")  # a dead letter
    # `third` stays pending, as a handler still running would hold it.

    assert await broker.purge_backlog(topic) == 5

    info = await broker.describe(topic)
    assert info is not None
    assert (info.length, info.delayed) == (0, 0)
    found = await groups(broker, topic)
    assert sorted(found) == ["a", "b"]
    for g in found.values():
        assert (g.lag, g.pending, g.retries) == (0, 0, 0)
    assert found["a"].dead_letters == 1
    assert await broker.dead_letters(a, 10) != []
    # The handler that held `third` ends after the purge: it settles nothing.
    assert not await broker.retry(a, third, 0.0)

    await broker.publish(topic, b"new")
    for sub in (a, b):
        [delivery] = await fetch_n(broker, sub, 1)
        assert (delivery.data, delivery.attempt) == (b"new", 1)
        assert await broker.fetch(sub, "c", 10, 0.1) == []


async def test_purge_backlog_of_an_unknown_topic_removes_nothing(
    broker: Broker, topic: str
) -> None:
    assert await broker.purge_backlog(topic) == 0
    assert await broker.describe(topic) is None
