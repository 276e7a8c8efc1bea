"""`Broker.publish_once`: one entry per key and window, whoever calls, on every broker.

What a fleet relies on to publish a schedule's tick or a debounced batch exactly once: any of
its processes may call, at the same time or after another died, with the same key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import anyio
import pytest

from omnidaemon.brokers import Broker, MemoryBroker, RedisBroker, Subscription, open_broker
from omnidaemon.brokers.nats import NatsBroker
from omnidaemon.brokers.nats._publishing import ONCE_HEADER
from omnidaemon.errors import NotReplicated
from tests.conformance.test_broker_contract import BROKERS  # the same buses, one list

pytestmark = pytest.mark.anyio


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with BROKERS[request.param](request) as b:
        yield b


@pytest.fixture
def topic() -> str:
    return f"t{uuid4().hex[:12]}.once"


async def subscribed(broker: Broker, topic: str) -> Subscription:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    return sub


async def received(broker: Broker, sub: Subscription, n: int) -> list[bytes]:
    """The group's entries once `n` arrived (within a deadline), and nothing more after."""
    got: list[bytes] = []
    with anyio.fail_after(5):
        while len(got) < n:
            batch = await broker.fetch(sub, "c", 100, 0.5)
            await broker.ack(sub, batch)
            got += [d.data for d in batch]
    extra = await broker.fetch(sub, "c", 100, 0.05)
    return got + [d.data for d in extra]


async def test_one_entry_per_key(broker: Broker, topic: str) -> None:
    sub = await subscribed(broker, topic)
    assert await broker.publish_once(topic, b"tick", "k", window=60) is True
    assert await broker.publish_once(topic, b"again", "k", window=60) is False
    assert await broker.publish_once(topic, b"other", "k2", window=60) is True
    assert await broker.publish_once(topic, b"tock", "k", window=60) is False
    assert await received(broker, sub, 2) == [b"tick", b"other"]


async def test_a_key_counts_per_topic(broker: Broker, topic: str) -> None:
    other = f"{topic}.other"
    subs = [await subscribed(broker, topic), await subscribed(broker, other)]
    assert await broker.publish_once(topic, b"a", "k", window=60) is True
    assert await broker.publish_once(other, b"b", "k", window=60) is True
    assert await received(broker, subs[0], 1) == [b"a"]
    assert await received(broker, subs[1], 1) == [b"b"]


async def test_concurrent_calls_with_one_key_append_once(broker: Broker, topic: str) -> None:
    sub = await subscribed(broker, topic)
    results: list[bool] = []

    async def call(i: int) -> None:
        results.append(await broker.publish_once(topic, f"{i}".encode(), "same", window=60))

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(call, i)
    assert sorted(results) == [False] * 19 + [True]
    assert len(await received(broker, sub, 1)) == 1


async def test_the_key_is_free_again_once_the_window_passed(broker: Broker, topic: str) -> None:
    if isinstance(broker, NatsBroker):
        pytest.skip(
            "NATS holds a key for the stream's de-duplication window (two minutes, a setting "
            "of the stream, not of a publish): a short window cannot be had per test"
        )
    sub = await subscribed(broker, topic)
    assert await broker.publish_once(topic, b"first", "k", window=0.3) is True
    assert await broker.publish_once(topic, b"early", "k", window=0.3) is False
    if isinstance(broker, MemoryBroker):
        broker.advance(0.31)  # the bus's clock, which its marks expire by
        assert await broker.publish_once(topic, b"second", "k", window=0.3) is True
    else:
        with anyio.fail_after(5):
            while not await broker.publish_once(topic, b"second", "k", window=0.3):
                await anyio.sleep(0.05)
    assert await received(broker, sub, 2) == [b"first", b"second"]


async def test_a_memory_mark_lasts_the_window_on_the_bus_clock() -> None:
    broker = MemoryBroker(None)
    sub = await subscribed(broker, "t")
    assert await broker.publish_once("t", b"1", "k", window=10)
    broker.advance(9.9)
    assert not await broker.publish_once("t", b"2", "k", window=10)
    broker.advance(0.2)
    assert await broker.publish_once("t", b"3", "k", window=10)
    assert await received(broker, sub, 2) == [b"1", b"3"]


# Redis specifics --------------------------------------------------------------------------


async def test_redis_a_repeated_try_of_one_call_learns_it_appended(
    redis_url: str, topic: str
) -> None:
    """The script's reply can be lost after it ran (a dropped connection): the call's retry
    finds its own token in the mark and reports the append, which it does not repeat."""
    async with RedisBroker(redis_url) as broker:
        sub = await subscribed(broker, topic)
        keys = [broker.stream_key(topic), broker.once_key(topic, "k")]
        for _ in range(2):
            done = await broker._script("APPEND_ONCE", keys=keys, args=[100, b"x", 60_000, "t1"])
            assert done == 1
        done = await broker._script("APPEND_ONCE", keys=keys, args=[100, b"x", 60_000, "t2"])
        assert done == 0
        assert await received(broker, sub, 1) == [b"x"]


async def test_redis_mark_names_keep_the_topic_slot_and_escape_braces() -> None:
    broker = RedisBroker("redis://h:1")
    mark = broker.once_key("orders", "a}b%c")
    assert mark == "omni:{orders}:once:a%7Db%25c"
    assert broker.stream_key("orders").startswith("omni:{orders}:")


async def test_redis_min_replicas_is_waited_for_as_by_publish(redis_url: str, topic: str) -> None:
    # A lone server has no replica: stored, but the call says it is not safe, as publish does.
    async with RedisBroker(redis_url, min_replicas=1, publish_timeout=0.2) as broker:
        sub = await subscribed(broker, topic)
        with pytest.raises(NotReplicated):
            await broker.publish_once(topic, b"x", "k", window=60)
        with pytest.raises(NotReplicated):  # appends nothing, and cannot tell it is safe
            await broker.publish_once(topic, b"y", "k", window=60)
        assert await received(broker, sub, 1) == [b"x"]


# NATS specifics ---------------------------------------------------------------------------


async def test_nats_a_repeated_try_of_one_call_learns_it_appended(
    nats_url: str, topic: str
) -> None:
    """A try whose acknowledgement was lost is repeated with the same id: JetStream answers
    `duplicate`, and the entry's token tells whose it is."""
    broker = open_broker(nats_url)
    assert isinstance(broker, NatsBroker)
    async with broker:
        sub = await subscribed(broker, topic)
        headers = {"Nats-Msg-Id": "once:k", ONCE_HEADER: "t1"}
        subject = broker._names.entries(topic)
        first, _ = await broker._durably(topic, subject, b"x", headers)
        again, _ = await broker._durably(topic, subject, b"x", headers)
        assert not first.get("duplicate") and again.get("duplicate")
        assert again["seq"] == first["seq"]
        assert await broker._made_by(topic, again["seq"], "t1")
        assert not await broker._made_by(topic, again["seq"], "t2")
        # The headers do not reach the handler: a delivery is the entry's bytes, attempt 1.
        [delivery] = await broker.fetch(sub, "c", 10, 2.0)
        assert (delivery.data, delivery.attempt) == (b"x", 1)


async def test_nats_a_window_longer_than_the_stream_s_is_held_by_a_mark(
    nats_url: str, topic: str
) -> None:
    """Past the stream's de-duplication window, a mark written after the append holds the
    key: seen here by deleting the topic, whose stream takes the ids it knew with it."""
    async with open_broker(nats_url) as broker:
        assert await broker.publish_once(topic, b"x", "long", window=600) is True
        assert await broker.publish_once(topic, b"y", "short", window=60) is True
        await broker.delete_topic(topic)
        assert await broker.publish_once(topic, b"x", "long", window=600) is False
        assert await broker.publish_once(topic, b"y", "short", window=60) is True


async def test_the_default_for_other_buses_appends_once_per_window() -> None:
    """`Broker.publish_once` as a bus without an atomic override gets it (not atomic)."""
    broker = MemoryBroker(None)
    sub = await subscribed(broker, "t")
    assert await Broker.publish_once(broker, "t", b"1", "k", window=10)
    assert not await Broker.publish_once(broker, "t", b"2", "k", window=10)
    broker.advance(10.1)
    assert await Broker.publish_once(broker, "t", b"3", "k", window=10)
    assert await received(broker, sub, 2) == [b"1", b"3"]
