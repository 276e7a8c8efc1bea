"""The bus inspection API (`Broker.topics`, `describe`, `entries`, `stats`, ...), on every broker.

What `omnidaemon bus stats`, `metrics` and `health` show comes from here: each broker must
report the same numbers for the same history. Each broker joins by adding a factory to
`BROKERS`. The Redis and NATS brokers share one server with the rest of the session, so every
test uses topics and keys of its own and looks only at those.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
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
from omnidaemon.brokers.base import GroupInfo, TopicInfo
from omnidaemon.brokers.embedded import EmbeddedBroker
from omnidaemon.fleet import bus_stats

pytestmark = pytest.mark.anyio

# kind -> (request, bus name) -> a broker; brokers made with one bus name share one bus.
BROKERS: dict[str, Callable[[pytest.FixtureRequest, str], Broker]] = {
    "memory": lambda request, name: MemoryBroker(name),
    "redis": lambda request, name: RedisBroker(request.getfixturevalue("redis_url")),
    "cluster": lambda request, name: RedisBroker(request.getfixturevalue("cluster_url")),
    "embedded": lambda request, name: EmbeddedBroker(request.getfixturevalue("embedded_home")),
    "nats": lambda request, name: open_broker(request.getfixturevalue("nats_url")),
}

MakeBroker = Callable[[], Broker]


@pytest.fixture(params=sorted(BROKERS))
def make_broker(request: pytest.FixtureRequest) -> MakeBroker:
    """Make unconnected brokers on one bus, like the connections of separate processes."""
    factory, name = BROKERS[request.param], f"inspection-{uuid4().hex}"
    return lambda: factory(request, name)


@pytest.fixture
async def broker(make_broker: MakeBroker) -> AsyncIterator[Broker]:
    async with make_broker() as b:
        yield b


@pytest.fixture
def topic() -> str:
    return f"insp{uuid4().hex[:10]}.events"


@pytest.fixture
def topics(request: pytest.FixtureRequest) -> Callable[[Sequence[str]], list[str]]:
    """Make fresh topic names `<base>.<suffix>`, one per suffix, sharing one base. On the
    cluster they land on different masters, so listings and stats must gather every master's."""

    def make(suffixes: Sequence[str]) -> list[str]:
        if request.node.callspec.params.get("make_broker") == "cluster":
            cluster = request.getfixturevalue("shared_cluster")
            base = "insp" + cluster.spread(lambda tag: [f"insp{tag}.{s}" for s in suffixes])
        else:
            base = f"insp{uuid4().hex[:10]}"
        return [f"{base}.{suffix}" for suffix in suffixes]

    return make


async def describe(broker: Broker, topic: str, *, consumers: bool = False) -> TopicInfo:
    info = await broker.describe(topic, consumers=consumers)
    assert info is not None
    return info


async def group(broker: Broker, sub: Subscription, *, consumers: bool = False) -> GroupInfo:
    info = await describe(broker, sub.topic, consumers=consumers)
    [found] = [g for g in info.groups if g.group == sub.group]
    return found


async def fetch_n(broker: Broker, sub: Subscription, consumer: str, n: int) -> list[Delivery]:
    """Fetch exactly `n` deliveries (in as many calls as it takes, within a deadline)."""
    got: list[Delivery] = []
    with anyio.fail_after(5):
        while len(got) < n:
            got += await broker.fetch(sub, consumer, n - len(got), 0.5)
    assert len(got) == n
    return got


async def test_topics_lists_every_published_topic_sorted(
    broker: Broker, topics: Callable[[Sequence[str]], list[str]]
) -> None:
    alpha, bravo, charlie = topics(["alpha", "bravo", "charlie"])
    for name in (charlie, alpha, bravo):
        await broker.publish(name, b"x")
    await broker.publish(alpha, b"y")
    names = await broker.topics()
    assert names == sorted(names)
    base = alpha.rpartition(".")[0]
    assert [n for n in names if n.startswith(base)] == [alpha, bravo, charlie]


async def test_describe_an_unknown_topic_is_none(broker: Broker, topic: str) -> None:
    assert await broker.describe(topic) is None
    assert topic not in await broker.topics()


async def test_describe_counts_entries_delayed_and_groups(broker: Broker, topic: str) -> None:
    a, b = Subscription(topic, "a"), Subscription(topic, "b")
    await broker.subscribe(b)
    await broker.subscribe(a)
    await broker.publish_many([(topic, str(i).encode()) for i in range(5)])
    await broker.publish(topic, b"later", delay=60)
    await broker.publish(topic, b"much later", delay=120)
    info = await describe(broker, topic)
    assert (info.topic, info.length, info.delayed) == (topic, 5, 2)
    assert [g.group for g in info.groups] == ["a", "b"]  # sorted by name
    assert all(g.topic == topic for g in info.groups)
    # Nothing fetched yet: every entry is lag, nothing is pending.
    for g in info.groups:
        assert (g.lag, g.pending, g.retries, g.dead_letters) == (5, 0, 0, 0)
        assert g.oldest_pending_age is None
        assert g.consumer_details == ()


async def test_describe_and_bus_stats_tell_what_delayed_events_hold(
    broker: Broker, topic: str
) -> None:
    # Delayed events are not trimmed with the stream: an operator must see what they take.
    entry = b"x" * 100_000
    for _ in range(20):
        await broker.publish(topic, entry, delay=3600)
    info = await describe(broker, topic)
    assert info.delayed == 20
    assert info.delayed_bytes is not None
    assert 2_000_000 <= info.delayed_bytes <= 2_500_000
    totals = (await bus_stats(broker)).totals
    assert totals["delayed"] >= 20  # the bus is shared with other tests
    assert totals["delayed_bytes"] >= 2_000_000


async def test_a_topic_with_only_delayed_events_is_listed(broker: Broker, topic: str) -> None:
    # Published with a delay before any agent subscribed: an operator still sees it waiting.
    await broker.publish(topic, b"later", delay=60)
    assert topic in await broker.topics()
    info = await describe(broker, topic)
    assert (info.length, info.delayed, info.groups) == (0, 1, ())


async def test_lag_counts_entries_not_yet_handed_out(broker: Broker, topic: str) -> None:
    fast, slow = Subscription(topic, "fast"), Subscription(topic, "slow")
    await broker.subscribe(fast)
    await broker.subscribe(slow)
    await broker.publish_many([(topic, b"x")] * 4)
    await fetch_n(broker, fast, "c", 3)
    assert (await group(broker, fast)).lag == 1
    assert (await group(broker, slow)).lag == 4
    await fetch_n(broker, fast, "c", 1)
    assert (await group(broker, fast)).lag == 0


async def test_pending_retries_and_dead_letters_follow_a_delivery(
    broker: Broker, topic: str
) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [first] = await broker.fetch(sub, "c", 10, 1.0)
    g = await group(broker, sub)
    assert (g.lag, g.pending, g.retries, g.dead_letters) == (0, 1, 0, 0)

    await broker.retry(sub, first, 0.0)  # scheduled, due now, not handed out yet
    g = await group(broker, sub)
    assert (g.pending, g.retries) == (0, 1)
    assert g.oldest_pending_age is None

    [second] = await broker.fetch(sub, "c", 10, 1.0)  # the retry, handed out
    assert second.attempt == 2
    g = await group(broker, sub)
    assert (g.pending, g.retries) == (1, 0)

    await broker.retry(sub, second, 60.0)  # scheduled for later
    g = await group(broker, sub)
    assert (g.pending, g.retries) == (0, 1)

    await broker.publish(topic, b"y")
    [third] = await broker.fetch(sub, "c", 10, 1.0)
    await broker.dead_letter(sub, third, b"record")
    g = await group(broker, sub)
    assert (g.lag, g.pending, g.retries, g.dead_letters) == (0, 0, 1, 1)


async def test_oldest_pending_age_is_the_age_of_the_oldest_unsettled_entry(
    broker: Broker, topic: str
) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"old")
    published = time.time()
    await anyio.sleep(0.4)
    await broker.publish(topic, b"new")
    old, new = await fetch_n(broker, sub, "c", 2)
    age = (await group(broker, sub)).oldest_pending_age
    assert age is not None
    assert 0.35 <= age <= time.time() - published + 0.5  # the old entry's, not the new one's
    await broker.ack(sub, [old])
    age = (await group(broker, sub)).oldest_pending_age
    assert age is not None and age < 0.35  # now the newer entry is the oldest pending
    await broker.ack(sub, [new])
    assert (await group(broker, sub)).oldest_pending_age is None


async def test_a_pending_retry_has_an_age(broker: Broker, topic: str) -> None:
    # A retry handed out and never settled is pending like any other delivery: health checks
    # must see it age.
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [first] = await broker.fetch(sub, "c", 10, 1.0)
    await broker.retry(sub, first, 0.0)
    [again] = await broker.fetch(sub, "c", 10, 1.0)
    assert again.attempt == 2
    age = (await group(broker, sub)).oldest_pending_age
    assert age is not None and 0 <= age < 5
    await anyio.sleep(0.3)
    later = (await group(broker, sub)).oldest_pending_age
    assert later is not None and later >= age + 0.25
    await broker.ack(sub, [again])
    assert (await group(broker, sub)).oldest_pending_age is None


async def test_consumer_details_when_asked(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"x")] * 3)
    await fetch_n(broker, sub, "worker-b", 2)
    await anyio.sleep(0.3)
    await fetch_n(broker, sub, "worker-a", 1)
    assert (await group(broker, sub)).consumer_details == ()  # not asked for
    g = await group(broker, sub, consumers=True)
    assert g.consumers == 2
    assert [(c.name, c.pending) for c in g.consumer_details] == [("worker-a", 1), ("worker-b", 2)]
    idle = {c.name: c.idle for c in g.consumer_details}
    assert 0 <= idle["worker-a"] < 0.25
    assert 0.25 <= idle["worker-b"] < 5


async def test_consumer_details_count_retry_deliveries(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"x"), (topic, b"y")])
    first, _ = await fetch_n(broker, sub, "c", 2)
    await broker.retry(sub, first, 0.0)
    [again] = await broker.fetch(sub, "c", 10, 1.0)
    assert again.attempt == 2
    g = await group(broker, sub, consumers=True)
    assert g.pending == 2
    assert [(c.name, c.pending) for c in g.consumer_details] == [("c", 2)]


async def test_entries_are_the_most_recent_oldest_first(broker: Broker, topic: str) -> None:
    await broker.publish_many([(topic, str(i).encode()) for i in range(5)])
    recent = await broker.entries(topic, 3)
    assert [data for _, data in recent] == [b"2", b"3", b"4"]
    everything = await broker.entries(topic, 100)
    assert [data for _, data in everything] == [str(i).encode() for i in range(5)]
    assert len({entry_id for entry_id, _ in everything}) == 5
    assert await broker.entries(topic, 0) == []
    assert await broker.entries(f"{topic}.unknown", 3) == []


async def test_purge_dead_letters_empties_one_group_only(broker: Broker, topic: str) -> None:
    a, b = Subscription(topic, "a"), Subscription(topic, "b")
    await broker.subscribe(a)
    await broker.subscribe(b)
    await broker.publish_many([(topic, b"1"), (topic, b"2")])
    for sub in (a, b):
        for n, delivery in enumerate(await fetch_n(broker, sub, "c", 2)):
            await broker.dead_letter(sub, delivery, f"{sub.group}-{n}".encode())
    assert await broker.purge_dead_letters(a) == 2
    assert await broker.dead_letters(a, 10) == []
    assert [record for _, record in await broker.dead_letters(b, 10)] == [b"b-0", b"b-1"]
    assert (await group(broker, a)).dead_letters == 0
    assert (await group(broker, b)).dead_letters == 2
    assert await broker.purge_dead_letters(a) == 0


async def test_ack_stats_are_summed_per_group_across_workers(
    make_broker: MakeBroker, topic: str
) -> None:
    a, b = Subscription(topic, "a"), Subscription(topic, "b")
    async with make_broker() as one, make_broker() as two:
        for sub in (a, b):
            await one.subscribe(sub)
        await one.publish_many([(topic, b"1"), (topic, b"2")])
        [d1] = await one.fetch(a, "one", 1, 1.0)
        [d2] = await two.fetch(a, "two", 1, 1.0)
        await one.ack(a, [d1], stats={"received": 1, "succeeded": 1, "duration:3": 1})
        await two.ack(a, [d2], stats={"received": 1, "failed": 1, "duration:3": 1})
        await two.ack(a, [], stats={"received": 3, "duration:sum_us": 1500})
        await one.ack(b, [], stats={"dead_lettered": 1})
        mine = {key: fields for key, fields in (await two.stats()).items() if key[0] == topic}
    assert mine == {
        (topic, "a"): {
            "received": 5,
            "succeeded": 1,
            "failed": 1,
            "duration:3": 2,
            "duration:sum_us": 1500,
        },
        (topic, "b"): {"dead_lettered": 1},
    }


async def test_ack_stats_keep_the_smallest_and_largest_across_workers(
    make_broker: MakeBroker, topic: str
) -> None:
    # Issue 16: quantiles are clamped to the extremes, which must merge like the sums do.
    a = Subscription(topic, "a")
    async with make_broker() as one, make_broker() as two:
        await one.subscribe(a)
        await one.ack(a, [], stats={"duration:min_us": 500, "duration:max_us": 40_000_000})
        await two.ack(a, [], stats={"duration:min_us": 900, "duration:max_us": 80_000_000})
        await two.ack(a, [], stats={"duration:min_us": 200, "duration:le1": 1})
        await one.ack(a, [], stats={"duration:max_us": 79_000_000, "duration:le1": 1})
        mine = (await two.stats())[(topic, "a")]
    assert mine == {
        "duration:min_us": 200,
        "duration:max_us": 80_000_000,
        "duration:le1": 2,
    }


async def test_ack_with_only_stats_settles_nothing(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [delivery] = await broker.fetch(sub, "c", 1, 1.0)
    await broker.ack(sub, [], stats={"received": 1})
    assert (await group(broker, sub)).pending == 1
    assert (await broker.stats())[(topic, "g")] == {"received": 1}
    await broker.ack(sub, [delivery])  # no stats: the counts stay as they are
    assert (await group(broker, sub)).pending == 0
    assert (await broker.stats())[(topic, "g")] == {"received": 1}


async def test_delete_topic_removes_its_stats(
    broker: Broker, topics: Callable[[Sequence[str]], list[str]]
) -> None:
    topic, other = topics(["events", "other"])
    for name in (topic, other):
        sub = Subscription(name, "g")
        await broker.subscribe(sub)
        await broker.ack(sub, [], stats={"received": 2})
    await broker.delete_topic(topic)
    stats = await broker.stats()
    assert (topic, "g") not in stats
    assert stats[(other, "g")] == {"received": 2}
    assert await broker.describe(topic) is None
    assert topic not in await broker.topics()


async def test_scan_values_returns_live_keys_with_the_prefix(broker: Broker) -> None:
    prefix = f"scan-{uuid4().hex[:8]}:"
    await broker.set_value(f"{prefix}long", b"1", 60)
    await broker.set_value(f"{prefix}short", b"2", 0.2)
    await broker.set_value(f"{prefix}gone", b"3", 60)
    await broker.delete_value(f"{prefix}gone")
    await broker.set_value(f"other-{prefix}x", b"4", 60)
    await broker.set_value(f"{prefix[:-1]}", b"5", 60)  # a prefix of the prefix
    assert await broker.scan_values(prefix) == {f"{prefix}long": b"1", f"{prefix}short": b"2"}
    with anyio.fail_after(5):
        while f"{prefix}short" in (found := await broker.scan_values(prefix)):
            await anyio.sleep(0.05)
    assert found == {f"{prefix}long": b"1"}
    assert await broker.scan_values(f"no-such-{prefix}") == {}


async def test_scan_values_takes_glob_characters_literally(broker: Broker) -> None:
    tag = uuid4().hex[:8]
    await broker.set_value(f"glob-{tag}:a*b", b"star", 60)
    await broker.set_value(f"glob-{tag}:axb", b"plain", 60)
    assert await broker.scan_values(f"glob-{tag}:a*") == {f"glob-{tag}:a*b": b"star"}


async def test_server_info_and_ping(broker: Broker) -> None:
    await broker.ping()
    info = await broker.server_info()
    assert isinstance(info.get("server"), str) and info["server"]
    assert all(isinstance(v, str) for v in info.values())
