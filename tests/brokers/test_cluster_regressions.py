"""Regressions the chaos suite's cluster mode (`python -m tests.chaos --cluster`) found in
the Redis broker on a Redis Cluster (issue 17), each with the smallest reproduction."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from omnidaemon.brokers import RedisBroker, Subscription, open_broker
from omnidaemon.errors import BusUnavailable, ConfigurationError, NotReplicated
from tests.cluster import HOST, RedisCluster, running_cluster

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


async def test_a_publish_waits_out_a_cluster_that_is_down(tmp_path: Path) -> None:
    # While a failed master's replica is not yet promoted, every master answers CLUSTERDOWN
    # (a cluster serves all its slots or none): even a topic whose own master is healthy.
    # The publish raised ClusterDownError at once; it is retried like an unreachable bus.
    # Without replicas the cluster stays down until the killed master is started again.
    with running_cluster(tmp_path, replicas=False) as cluster:
        topic = f"down{uuid4().hex[:8]}"
        mine = cluster.master_of(f"omni:{{{topic}}}:stream").port
        other = next(port for port in cluster.ports if port != mine)
        seed = f"redis://{HOST}:{mine}"  # a seed that stays up
        impatient = RedisBroker(seed, publish_timeout=1.0)
        broker = RedisBroker(seed, publish_timeout=30.0)
        async with impatient, broker:
            await broker.publish(topic, b"before")
            await impatient.publish(f"{topic}.other", b"slot map fetched")
            cluster.kill(other)
            while cluster.client(mine).cluster("INFO")["cluster_state"] != "fail":
                await anyio.sleep(0.05)
            with pytest.raises(BusUnavailable, match="ClusterDownError"):
                await impatient.publish(topic, b"given up")
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, cluster.revive, other)
                await broker.publish(topic, b"after")  # once the cluster is up again
            entries = await broker.client.xrange(broker.stream_key(topic))
    assert [fields[b"e"] for _, fields in entries] == [b"before", b"after"]


async def test_a_replicated_publish_follows_a_failover_it_learns_of_by_moved(
    redis_cluster: RedisCluster,
) -> None:
    # With min_replicas, WAIT goes after the XADD on the same connection. After a failover the
    # broker's map still names the old master, now a replica: the XADD is answered MOVED and
    # the WAIT "cannot be used with replica instances". That error was raised before the
    # MOVED was looked at, so the map was never updated: every later publish failed the same.
    topic = f"moved{uuid4().hex[:8]}"
    broker = RedisBroker(redis_cluster.url, min_replicas=1, publish_timeout=5.0)
    async with broker:
        await broker.publish(topic, b"before")
        old = redis_cluster.master_of(broker.stream_key(topic)).port
        replica = next(
            node["port"]
            for node in redis_cluster.cluster_nodes()
            if node["master_id"] == redis_cluster.master_of(broker.stream_key(topic)).node_id
        )
        redis_cluster.client(replica).execute_command("CLUSTER", "FAILOVER")  # no data lost
        while redis_cluster.role(old) != "slave":
            await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(redis_cluster.wait_ok)
        await broker.publish(topic, b"after")
        await broker.publish(topic, b"and after")
        entries = await broker.client.xrange(broker.stream_key(topic))
    assert [fields[b"e"] for _, fields in entries] == [b"before", b"after", b"and after"]


def test_a_wait_refused_by_a_demoted_master_is_not_replicated() -> None:
    # A publish that ran on a master demoted before WAIT answered (WAIT is then refused, or
    # unblocked with an error) may be lost with that node: NotReplicated, a BusUnavailable.
    broker = RedisBroker("redis://127.0.0.1:1", min_replicas=1)
    for refusal in (
        "WAIT cannot be used with replica instances. Please also note that since Redis 4.0...",
        "UNBLOCKED force unblock from blocking operation, instance state changed "
        "(master -> replica?)",
    ):
        with pytest.raises(NotReplicated, match="replica"):
            broker._check_replicas(ResponseError(refusal), "publish")
        broker._check_replicas(ResponseError(refusal), "settle")  # a warning only
    with pytest.raises(ResponseError, match="NOPERM"):
        broker._check_replicas(ResponseError("NOPERM no permissions to run 'wait'"), "publish")


@pytest.mark.parametrize("seeds", ["one", "several"])
async def test_a_broker_made_before_the_cluster_answers_waits_for_it(
    tmp_path: Path, seeds: str
) -> None:
    # A worker started before its cluster (or while every seed is down) waits for the bus
    # with backoff (wait_for_bus retries what ping raises while the bus is unreachable).
    # Several seeds: redis-py's "Redis Cluster cannot be connected" is no ConnectionError,
    # so the worker exited at once. One seed: ping went through the plain client made at
    # connect, never switched to the cluster client, so subscribing met MOVED and exited.
    cluster = RedisCluster(tmp_path, replicas=False)  # not started: nothing listens yet
    ports = list(cluster.nodes)
    url = f"redis://{HOST}:{ports[0]}"
    if seeds == "several":
        url = "redis://" + ",".join(f"{HOST}:{port}" for port in ports)
    topic = f"cold{uuid4().hex[:8]}"
    broker = RedisBroker(url, publish_timeout=0.5)
    try:
        async with broker:
            with pytest.raises(RedisConnectionError):
                await broker.ping()
            with pytest.raises(BusUnavailable):
                await broker.publish(topic, b"too early")
            await anyio.to_thread.run_sync(cluster.start)
            await broker.ping()
            assert broker.is_cluster
            # Every topic, wherever its slot is: no MOVED reaches the caller.
            for n in range(6):
                await broker.subscribe(Subscription(f"{topic}{n}", "agent"))
            await broker.publish(topic, b"on time")
            entries = await broker.client.xrange(broker.stream_key(topic))
    finally:
        cluster.stop()
    assert [fields[b"e"] for _, fields in entries] == [b"on time"]
