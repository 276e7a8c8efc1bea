"""The Redis broker on a Redis Cluster, where it differs from one server: topics spread over
masters, listings and stats gathered from every master, seed lists, and a fresh broker whose
first command takes the broker's own fast path (no slot map fetched yet).

The broker contract, inspection, delivery and purge suites run on the cluster too (their
`BROKERS` have a "cluster" entry); these tests pin what only a cluster can get wrong. They
share the session's cluster (`shared_cluster`, 3 masters, no replicas) and never break it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.errors import BusUnavailable
from omnidaemon.fleet import bus_stats, describe_topics
from omnidaemon.retry import Backoff
from omnidaemon.worker.startup import wait_for_bus
from tests.cluster import RedisCluster
from tests.servers import free_port

pytestmark = pytest.mark.anyio


def topics_on_every_master(cluster: RedisCluster, per_master: int = 1) -> list[str]:
    """Fresh topic names, `per_master` on each master (by their stream key's slot), grouped by
    master; each is checked with the cluster's own CLUSTER KEYSLOT."""
    found: dict[int, list[str]] = {m.port: [] for m in cluster.masters()}
    for _ in range(per_master):
        tag = cluster.spread(lambda tag: [f"s{tag}.{n}" for n in range(len(found))])
        for n in range(len(found)):
            topic = f"s{tag}.{n}"
            found[cluster.master_of(stream_key(topic)).port].append(topic)
    assert all(len(names) == per_master for names in found.values())
    return [topic for names in found.values() for topic in names]


def stream_key(topic: str) -> str:
    return f"omni:{{{topic}}}:stream"


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


async def test_publish_many_over_topics_on_every_master_keeps_each_topic_s_order(
    broker: RedisBroker, shared_cluster: RedisCluster
) -> None:
    topics = topics_on_every_master(shared_cluster, per_master=2)
    # Per master, a topic of a few entries (plain XADDs) and one of many (APPEND_MANY, in two
    # chunks), all interleaved in one call: one pipeline per master goes out.
    counts = {topic: 3 if n % 2 else 1_500 for n, topic in enumerate(topics)}
    entries = [
        (topic, f"{topic}:{i}".encode())
        for i in range(max(counts.values()))
        for topic in topics
        if i < counts[topic]
    ]
    await broker.publish_many(entries)
    for topic, count in counts.items():
        master = shared_cluster.master_of(stream_key(topic))
        assert shared_cluster.client(master.port).xlen(stream_key(topic)) == count
        found = [data for _, data in await broker.entries(topic, 2 * count)]
        assert found == [f"{topic}:{i}".encode() for i in range(count)], topic
    # A consumer reads them in that order too.
    sub = Subscription(topics[0], "g")
    await broker.subscribe(sub)  # start="earliest": the entries already there
    got = [d.data for d in await broker.fetch(sub, "c", 2_000, 1.0)]
    assert got == [f"{topics[0]}:{i}".encode() for i in range(counts[topics[0]])]


async def test_listings_stats_and_values_gather_every_master(
    broker: RedisBroker, shared_cluster: RedisCluster
) -> None:
    streams = topics_on_every_master(shared_cluster)
    delayed_only = topics_on_every_master(shared_cluster)  # no stream: only a delayed set
    for topic in streams:
        await broker.publish(topic, b"x")
        await broker.ack(Subscription(topic, "g"), [], stats={"received": 1})
    for topic in delayed_only:
        await broker.publish(topic, b"later", delay=60)
    tag = shared_cluster.spread(lambda tag: [f"omni:value:v{tag}:{n}" for n in range(3)])
    values = {f"v{tag}:{n}": str(n).encode() for n in range(3)}
    for key, value in values.items():
        await broker.set_value(key, value, 60)
    owners = {shared_cluster.master_of(f"omni:value:{key}").port for key in values}
    assert len(owners) == 3

    listed = await broker.topics()
    assert set(streams + delayed_only) <= set(listed)
    assert listed == sorted(listed)
    stats = await broker.stats()
    assert {topic: stats.get((topic, "g")) for topic in streams} == {
        topic: {"received": 1} for topic in streams
    }
    assert await broker.scan_values(f"v{tag}:") == values
    described = {info.topic: info for info in await describe_topics(broker)}
    assert [described[topic].length for topic in streams] == [1, 1, 1]
    assert [described[topic].delayed for topic in delayed_only] == [1, 1, 1]
    assert (await bus_stats(broker)).totals["delayed"] >= 3


async def test_a_seed_list_whose_first_node_is_down_still_works(
    shared_cluster: RedisCluster,
) -> None:
    [topic] = topics_on_every_master(shared_cluster)[:1]
    sub = Subscription(topic, "g")
    url = seed_list([free_port(), *shared_cluster.ports])  # nothing listens on the first
    async with RedisBroker(url) as publisher:
        await publisher.publish(topic, b"first")  # the broker's first command
        assert publisher.is_cluster
    async with RedisBroker(url) as broker:
        await broker.ping()
        await broker.subscribe(sub)
        await broker.publish_many([(topic, b"second"), (topic, b"third")])
        got = await broker.fetch(sub, "c", 10, 1.0)
        assert [d.data for d in got] == [b"first", b"second", b"third"]
        await broker.ack(sub, got)
        assert topic in await broker.topics()
        info = await broker.describe(topic)
        assert info is not None and info.length == 3


async def test_a_broker_that_could_not_reach_its_bus_at_connect_finds_the_cluster_on_ping(
    shared_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker started before its bus connects, waits with `ping` until the bus answers, then
    subscribes: by then its broker must know the bus is a cluster, or every command of the
    client (a subscribe, a describe) meets MOVED for the keys of the other masters."""
    from omnidaemon.brokers.redis import _connection

    async def unreachable(client: object) -> bool:
        raise ConnectionError("not up yet")  # as a bus that does not answer at connect

    broker = RedisBroker(shared_cluster.url)
    monkeypatch.setattr(_connection, "cluster_enabled", unreachable)
    await broker.connect()
    monkeypatch.undo()
    try:
        await broker.ping()  # the bus answers now
        topics = topics_on_every_master(shared_cluster)
        for topic in topics:
            await broker.subscribe(Subscription(topic, "g"))
        assert broker.is_cluster
        for topic in topics:
            info = await broker.describe(topic)
            assert info is not None and [g.group for g in info.groups] == ["g"]
    finally:
        await broker.close()


async def test_a_publish_to_a_seed_list_none_of_which_answers_is_bus_unavailable() -> None:
    """As on one server: retried until `publish_timeout`, then `BusUnavailable` (redis-py's
    cluster client says `RedisClusterException`, which is no `ConnectionError`)."""
    url = seed_list([free_port(), free_port()])
    async with RedisBroker(url, publish_timeout=0.3) as broker:
        for publish in (
            lambda: broker.publish("t", b"x"),
            lambda: broker.publish_many([("t", b"x"), ("u", b"y")]),
        ):
            start = anyio.current_time()
            with pytest.raises(BusUnavailable, match=r"did not answer within 0\.3 s"):
                await publish()
            assert anyio.current_time() - start >= 0.1  # retried, not raised at once


async def test_a_worker_waits_for_a_seed_list_none_of_which_answers_yet() -> None:
    """A worker started before its cluster (docker-compose, a reboot) waits for it, as for one
    server, instead of crashing on redis-py's `RedisClusterException`."""
    url = seed_list([free_port(), free_port()])
    async with RedisBroker(url) as broker:
        with pytest.raises(BusUnavailable, match="did not answer within"):
            await wait_for_bus(broker, timeout=0.3, backoff=Backoff(initial=0.05, jitter=False))
