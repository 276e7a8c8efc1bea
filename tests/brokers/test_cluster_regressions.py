"""Regressions the chaos suite's cluster mode (`python -m tests.chaos --cluster`) found in
the Redis broker on a Redis Cluster (issue 17), each with the smallest reproduction."""

from __future__ import annotations

from uuid import uuid4

import pytest

from omnidaemon.brokers import RedisBroker, open_broker
from omnidaemon.errors import ConfigurationError
from tests.cluster import HOST, RedisCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _seed_list(cluster: RedisCluster) -> str:
    return "redis://" + ",".join(f"{HOST}:{port}" for port in cluster.ports)


@pytest.mark.parametrize("seeds", ["one", "several"])
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_a_new_brokers_first_command_may_be_a_publish(
    redis_cluster: RedisCluster, seeds: str, min_replicas: int
) -> None:
    # A publisher's first command is its first publish, which goes by the broker's own
    # connections: the cluster client had no slot map yet (KeyError: the slot number).
    url = redis_cluster.url if seeds == "one" else _seed_list(redis_cluster)
    topic = f"first{uuid4().hex[:8]}"
    broker = RedisBroker(url, min_replicas=min_replicas)
    async with broker:
        await broker.publish(topic, b"hello")
        assert broker.is_cluster
        entries = await broker.client.xrange(broker.stream_key(topic))
    assert [fields[b"e"] for _, fields in entries] == [b"hello"]


def test_open_broker_takes_a_list_of_seed_nodes() -> None:
    # The worker's CLI opens its broker with open_broker, which checked the URL's port with
    # urlsplit: "redis://h1:7000,h2:7001" was refused ("port is not a number").
    broker = open_broker("redis://:hunter2@10.0.0.1:7000,10.0.0.2:7001")
    assert isinstance(broker, RedisBroker)
    assert "hunter2" not in broker.url
    for bad in ("redis://:hunter2@10.0.0.1:7000,10.0.0.2:x", "redis://:hunter2@h:7000,:7001"):
        with pytest.raises(ConfigurationError) as info:
            open_broker(bad)
        assert "hunter2" not in str(info.value)
