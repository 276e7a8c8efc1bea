"""Pointing omnidaemon at a Redis Cluster: seed lists in the URL, what `bus stats` shows per
node, and the `min_replicas` durability setting's errors."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import redis

from omnidaemon import App
from omnidaemon.brokers import RedisBroker, open_broker
from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.redis import redact_url
from omnidaemon.brokers.redis._cluster import seeds
from omnidaemon.errors import ConfigurationError, NotReplicated
from tests.cluster import RedisCluster
from tests.e2e._support import cli_env, run_cli
from tests.servers import free_port

pytestmark = pytest.mark.anyio


def test_a_url_may_list_several_seed_nodes() -> None:
    url = "rediss://bob:S3cret@h1:7000,h2:7001 , [::1]:7002,h4/0"
    assert seeds(url) == [("h1", 7000), ("h2", 7001), ("::1", 7002), ("h4", 6379)]
    assert redact_url(url) == "rediss://bob:***@h1:7000,h2:7001 , [::1]:7002,h4/0"
    assert isinstance(open_broker("redis://h1:7000,h2:7000"), RedisBroker)
    for bad in ("redis://:S3cret@h1:7000,h2:70x0", "redis://:S3cret@h1:7000,:7001"):
        with pytest.raises(ConfigurationError) as info:
            open_broker(bad)
        assert "S3cret" not in str(info.value)


def test_min_replicas_comes_from_the_environment_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMNIDAEMON_REDIS_MIN_REPLICAS", "2")
    assert RedisBroker("redis://h:1")._min_replicas == 2
    assert RedisBroker("redis://h:1").clone()._min_replicas == 2
    assert RedisBroker("redis://h:1", min_replicas=0)._min_replicas == 0
    monkeypatch.setenv("OMNIDAEMON_REDIS_MIN_REPLICAS", "one")
    with pytest.raises(ConfigurationError, match="OMNIDAEMON_REDIS_MIN_REPLICAS"):
        RedisBroker("redis://h:1")


async def test_a_publish_no_replica_confirms_raises_not_replicated(redis_url: str) -> None:
    # A lone server has no replica: the write is stored, the publish says it is not safe.
    broker = RedisBroker(redis_url, min_replicas=1, publish_timeout=0.2)
    async with App("lonely", broker=broker) as app:
        topic = f"lonely-{free_port()}"
        sub = Subscription(topic, "g")
        await broker.subscribe(sub)
        with pytest.raises(NotReplicated, match="0 of the 1 replicas"):
            await app.publish(topic, {"n": 1})
        with pytest.raises(NotReplicated):
            await broker.publish_many([(topic, b"a"), (f"{topic}-2", b"b")])
        info = await broker.describe(topic)
        assert info is not None and info.length == 2  # stored on the master all the same
        # A settle is not refused: delivery is at least once, so an unconfirmed ack only
        # risks a second delivery after a failover.
        deliveries = await broker.fetch(sub, "c", 10, 1.0)
        assert len(deliveries) == 2
        await broker.ack(sub, deliveries, stats={"handled": 2})
        info = await broker.describe(topic)
        assert info is not None and info.groups[0].pending == 0


async def test_a_cluster_is_found_from_one_seed_and_bus_stats_lists_its_nodes(
    shared_cluster: RedisCluster, tmp_path: Path
) -> None:
    broker = RedisBroker(shared_cluster.url)
    await broker.connect()
    try:
        assert broker.is_cluster
        topics = [f"stats-{n}-{free_port()}" for n in range(12)]
        for topic in topics:
            await broker.subscribe(Subscription(topic, "agent"))
        owners = {shared_cluster.master_of(broker.stream_key(t)).port for t in topics}
        assert len(owners) >= 2  # the topics spread over the masters
    finally:
        await broker.close()
    # Every seed but the last is a dead port: the one that answers gives the whole map.
    dead = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    url = f"redis://{dead},127.0.0.1:{shared_cluster.ports[-1]}"
    result = run_cli(["bus", "stats", "--json"], tmp_path, cli_env(OMNIDAEMON_BROKER_URL=url))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["server"]["masters"] == "3"
    nodes = stats["nodes"]
    masters = [n for n in nodes if n["role"] == "master"]
    replicas = [n for n in nodes if n["role"] == "replica"]
    assert len(masters) == 3 and len(replicas) == len(shared_cluster.ports) - 3
    assert sum(n["slots"] for n in masters) == 16384
    assert sum(n["topics"] for n in masters) == stats["totals"]["topics"] >= len(topics)
    assert {r["replica_of"] for r in replicas} <= {m["address"] for m in masters}
    table = run_cli(["bus", "stats"], tmp_path, cli_env(OMNIDAEMON_BROKER_URL=url))
    assert "cluster nodes" in table.stdout and "REPLICA OF" in table.stdout


async def test_a_user_who_may_not_run_info_gets_a_single_server_broker(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    user = f"noinfo{free_port()}"
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-info")
    try:
        host = redis_url.split("//", 1)[1].split("/", 1)[0].rpartition("@")[2]
        broker = RedisBroker(f"redis://{user}:pw@{host}/0")
        async with App("noinfo", broker=broker) as app:
            await broker.ping()
            assert not broker.is_cluster
            topic = f"noinfo-{free_port()}"
            await broker.subscribe(Subscription(topic, "g"))
            await app.publish(topic, {"n": 1})
            assert len(await broker.fetch(Subscription(topic, "g"), "c", 10, 1.0)) == 1
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


async def test_a_finished_delivery_whose_ack_waits_for_replicas_keeps_its_lease(
    redis_url: str,
) -> None:
    # Workers with min_replicas=1 on a server without replicas: every ack waits WAIT's whole
    # timeout (1.5 s) before it is taken as done. Its deliveries were not lease-renewed
    # meanwhile (only running handlers were), so the other worker took them over after
    # reclaim_idle and ran them again (the chaos suite's cluster runs saw thousands).
    topic = f"slowack-{free_port()}"
    apps = [
        App("slowack", broker=RedisBroker(redis_url, min_replicas=1, publish_timeout=1.5))
        for _ in range(2)
    ]
    runs: list[str] = []
    for app in apps:

        @app.agent(topic, reclaim_idle=0.3, name="quick")
        async def quick(event: dict[str, str]) -> None:
            runs.append(event["k"])

    publisher = App("slowack-publisher", broker=RedisBroker(redis_url, min_replicas=0))
    async with publisher, apps[0].running(), apps[1].running():
        # The first events' ack waits; what finishes meanwhile queues behind it, unsent.
        await publisher.publish_many([(topic, {"k": f"first{n}"}) for n in range(2)])
        with anyio.fail_after(10):
            while len(runs) < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(0.1)
        await publisher.publish_many([(topic, {"k": f"e{n}"}) for n in range(6)])
        with anyio.fail_after(10):
            while len(runs) < 8:
                await anyio.sleep(0.02)
        await anyio.sleep(3.5)  # past the queued acks' wait, ten reclaim periods
    expected = [f"first{n}" for n in range(2)] + [f"e{n}" for n in range(6)]
    assert sorted(runs) == sorted(expected)  # each once
