"""The Redis broker on a Redis Cluster, where it differs from one server: topics spread over
masters, listings and stats gathered from every master, seed lists, and a fresh broker whose
first command takes the broker's own fast path (no slot map fetched yet).

The broker contract, inspection, delivery and purge suites run on the cluster too (their
`BROKERS` have a "cluster" entry); these tests pin what only a cluster can get wrong. They
share the session's cluster (`shared_cluster`, 3 masters, no replicas) and never break it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from omnidaemon.brokers import RedisBroker, Subscription
from tests.cluster import RedisCluster

pytestmark = pytest.mark.anyio


def topics_on_every_master(cluster: RedisCluster, per_master: int = 1) -> list[str]:
    """Fresh topic names, `per_master` on each master (by their stream key's slot)."""
    found: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    while any(len(names) < per_master for names in found.values()):
        topic = f"spread{uuid4().hex[:10]}.events"
        names = found[cluster.master_of(f"omni:{{{topic}}}:stream").port]
        if len(names) < per_master:
            names.append(topic)
    return [topic for names in found.values() for topic in names]


def seed_list(ports: list[int]) -> str:
    """A broker URL naming several seed nodes: `redis://127.0.0.1:7000,127.0.0.1:7001`."""
    return "redis://" + ",".join(f"127.0.0.1:{port}" for port in ports)


@pytest.fixture
async def broker(cluster_url: str) -> AsyncIterator[RedisBroker]:
    async with RedisBroker(cluster_url) as b:
        yield b


async def test_a_fresh_broker_s_first_command_may_be_a_publish(
    shared_cluster: RedisCluster,
) -> None:
    """A publisher's first command, a publish, goes on a connection of the broker's own, to
    the master of the topic's slot: the slot map must be fetched first (by one seed or by
    several), not looked up in the cluster client's empty cache."""
    [topic] = topics_on_every_master(shared_cluster)[:1]
    sub = Subscription(topic, "g")
    async with RedisBroker(shared_cluster.url) as setup:
        await setup.subscribe(sub)
    for url in (shared_cluster.url, seed_list(shared_cluster.ports)):
        async with RedisBroker(url) as broker:
            await broker.publish(topic, url.encode())
            assert broker.is_cluster
    async with RedisBroker(shared_cluster.url) as reader:
        got = await reader.fetch(sub, "c", 10, 1.0)
    assert [d.data for d in got] == [
        shared_cluster.url.encode(),
        seed_list(shared_cluster.ports).encode(),
    ]
