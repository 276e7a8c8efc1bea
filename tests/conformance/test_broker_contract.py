"""The broker contract (`omnidaemon/brokers/base.py`), checked against every broker.

Each broker joins by adding a factory to `BROKERS`; every test here runs against each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from uuid import uuid4

import anyio
import pytest

from omnidaemon.brokers import Broker, MemoryBroker, RedisBroker, Subscription, open_broker
from omnidaemon.brokers.embedded import EmbeddedBroker

pytestmark = pytest.mark.anyio

BROKERS: dict[str, Callable[[pytest.FixtureRequest], Broker]] = {
    "memory": lambda request: MemoryBroker(None),
    "redis": lambda request: RedisBroker(request.getfixturevalue("redis_url")),
    "cluster": lambda request: RedisBroker(request.getfixturevalue("cluster_url")),
    "embedded": lambda request: EmbeddedBroker(request.getfixturevalue("embedded_home")),
    "nats": lambda request: open_broker(request.getfixturevalue("nats_url")),
}


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with BROKERS[request.param](request) as b:
        yield b


@pytest.fixture
def topic() -> str:
    return f"t{uuid4().hex[:12]}.events"


async def fetch_all(broker: Broker, sub: Subscription, consumer: str, n: int) -> list[bytes]:
    """Fetch until `n` entries arrived (or a deadline passes)."""
    got: list[bytes] = []
    with anyio.fail_after(5):
        while len(got) < n:
            batch = await broker.fetch(sub, consumer, n - len(got), 0.5)
            await broker.ack(sub, batch)
            got += [d.data for d in batch]
    return got


async def test_every_group_gets_every_entry(broker: Broker, topic: str) -> None:
    a, b = Subscription(topic, "a"), Subscription(topic, "b")
    await broker.subscribe(a)
    await broker.subscribe(b)
    await broker.publish_many([(topic, b"1"), (topic, b"2"), (topic, b"3")])
    assert await fetch_all(broker, a, "c1", 3) == [b"1", b"2", b"3"]
    assert await fetch_all(broker, b, "c1", 3) == [b"1", b"2", b"3"]


async def test_consumers_of_one_group_share_entries(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, str(i).encode()) for i in range(10)])
    first = await broker.fetch(sub, "c1", 4, 0.5)
    second = await broker.fetch(sub, "c2", 100, 0.5)
    assert len(first) == 4
    assert sorted(d.data for d in first + second) == sorted(str(i).encode() for i in range(10))
    assert await broker.fetch(sub, "c3", 10, 0.05) == []


async def test_new_group_starts_at_retained_history_or_latest(broker: Broker, topic: str) -> None:
    await broker.publish(topic, b"before")
    early, late = Subscription(topic, "early"), Subscription(topic, "late", start="latest")
    await broker.subscribe(early)
    await broker.subscribe(late)
    await broker.publish(topic, b"after")
    assert await fetch_all(broker, early, "c", 2) == [b"before", b"after"]
    assert await fetch_all(broker, late, "c", 1) == [b"after"]


async def test_subscribe_is_idempotent(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    assert await fetch_all(broker, sub, "c", 1) == [b"x"]
    await broker.subscribe(sub)  # must not rewind the group
    assert await broker.fetch(sub, "c", 10, 0.05) == []


async def test_fetch_waits_for_a_publish(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    async with anyio.create_task_group() as tg:
        got: list[bytes] = []

        async def consume() -> None:
            got.extend(d.data for d in await broker.fetch(sub, "c", 10, 5.0))

        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        await broker.publish(topic, b"late")
    assert got == [b"late"]


async def test_fetch_times_out_empty(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    start = anyio.current_time()
    assert await broker.fetch(sub, "c", 10, 0.1) == []
    assert anyio.current_time() - start >= 0.09


async def test_an_interrupted_fetch_returns_at_once_and_the_next_one_works(
    broker: Broker, topic: str
) -> None:
    """What a graceful stop relies on: `interrupt` ends a fetch that waits for entries
    (instead of cancelling it), and the consumer fetches normally afterwards."""
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.fetch(sub, "c1", 10, 0.0)  # the consumer's reader exists, as in a worker
    with anyio.fail_after(10):  # a deadline, far below the fetch's own 30 s
        async with anyio.create_task_group() as tg:
            got: list[list[bytes]] = []

            async def consume() -> None:
                got.append([d.data for d in await broker.fetch(sub, "c1", 10, 30.0)])

            tg.start_soon(consume)
            while not got:
                await broker.interrupt(sub, "c1")  # as a stopping worker does, until it ends
                await anyio.sleep(0.05)
    assert got == [[]]
    await broker.publish(topic, b"after")
    with anyio.fail_after(5):
        [delivery] = await broker.fetch(sub, "c1", 10, 2.0)
    assert (delivery.data, delivery.attempt) == (b"after", 1)


async def test_a_cancelled_fetch_loses_nothing_and_the_next_one_works(
    broker: Broker, topic: str
) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    for _ in range(3):  # cancelled while blocked, several times on the same consumer
        with anyio.move_on_after(0.1):
            await broker.fetch(sub, "c1", 10, 5.0)
    await broker.publish(topic, b"after")
    with anyio.fail_after(5):
        [delivery] = await broker.fetch(sub, "c1", 10, 2.0)
    assert delivery.data == b"after"
    assert delivery.attempt == 1


async def test_first_delivery_is_attempt_one(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [delivery] = await broker.fetch(sub, "c", 10, 0.5)
    assert delivery.attempt == 1
    assert delivery.data == b"x"


async def test_retry_goes_to_the_failing_group_only(broker: Broker, topic: str) -> None:
    failing, other = Subscription(topic, "failing"), Subscription(topic, "other")
    await broker.subscribe(failing)
    await broker.subscribe(other)
    await broker.publish(topic, b"x")
    [delivery] = await broker.fetch(failing, "c", 10, 0.5)
    await broker.retry(failing, delivery, 0.0)
    [again] = await broker.fetch(failing, "c", 10, 1.0)
    assert (again.data, again.attempt) == (b"x", 2)
    assert await fetch_all(broker, other, "c", 1) == [b"x"]
    assert await broker.fetch(other, "c", 10, 0.1) == []


async def test_retry_waits_for_its_delay(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [delivery] = await broker.fetch(sub, "c", 10, 0.5)
    start = anyio.current_time()
    await broker.retry(sub, delivery, 0.3)
    assert await broker.fetch(sub, "c", 10, 0.1) == []
    [again] = await broker.fetch(sub, "c", 10, 2.0)
    assert anyio.current_time() - start >= 0.29
    assert again.attempt == 2


async def test_dead_letter_settles_and_keeps_the_record(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"bad"), (topic, b"worse")])
    first, second = await broker.fetch(sub, "c", 10, 0.5)
    await broker.dead_letter(sub, first, b"record-1")
    await broker.dead_letter(sub, second, b"record-2")
    records = await broker.dead_letters(sub, 10)
    assert [record for _, record in records] == [b"record-1", b"record-2"]
    assert len({record_id for record_id, _ in records}) == 2
    assert await broker.dead_letters(sub, 1) == records[1:]  # the most recent
    assert await broker.reclaim(sub, "other", 0.0, 10) == []
    assert await broker.dead_letters(Subscription(topic, "unrelated"), 10) == []


async def test_concurrent_replays_move_each_dead_letter_once(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    sent = sorted(f"event-{i:02}".encode() for i in range(50))
    await broker.publish_many([(topic, data) for data in sent])
    deliveries = []
    with anyio.fail_after(5):
        while len(deliveries) < 50:
            deliveries += await broker.fetch(sub, "c", 50 - len(deliveries), 0.5)
    for delivery in deliveries:
        await broker.dead_letter(sub, delivery, delivery.data)  # the record is the entry
    moved: list[int] = []

    async def replay() -> None:
        moved.append(await broker.replay_dead_letters(sub, lambda _id, record: record))

    async with anyio.create_task_group() as tg:  # two operators replaying at the same time
        tg.start_soon(replay)
        tg.start_soon(replay)
    assert sum(moved) == 50
    assert await broker.dead_letters(sub, 100) == []
    assert sorted(await fetch_all(broker, sub, "c", 50)) == sent
    assert await broker.fetch(sub, "c", 100, 0.2) == []  # no second copy of any of them


async def test_unsettled_delivery_is_reclaimed_as_a_new_attempt(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [_delivery] = await broker.fetch(sub, "crashed", 10, 0.5)
    assert await broker.reclaim(sub, "alive", 10.0, 10) == []  # not idle long enough
    with anyio.fail_after(5):
        while not (claimed := await broker.reclaim(sub, "alive", 0.2, 10)):
            await anyio.sleep(0.05)
    assert [(d.data, d.attempt) for d in claimed] == [(b"x", 2)]
    await broker.ack(sub, claimed)
    await anyio.sleep(0.25)
    assert await broker.reclaim(sub, "alive", 0.2, 10) == []


async def test_extend_keeps_a_live_consumer_lease(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    deliveries = await broker.fetch(sub, "alive", 10, 0.5)
    for _ in range(4):
        await anyio.sleep(0.1)
        await broker.extend(sub, "alive", deliveries)
        assert await broker.reclaim(sub, "thief", 0.25, 10) == []


async def consumer_names(broker: Broker, topic: str) -> list[str]:
    """The names of the consumers the bus lists for group `g` of `topic`."""
    info = await broker.describe(topic, consumers=True)
    assert info is not None
    [group] = info.groups
    return [c.name for c in group.consumer_details]


async def test_a_consumer_leaves_its_group_only_when_it_holds_nothing(
    broker: Broker, topic: str
) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    [first] = await broker.fetch(sub, "c1", 10, 0.5)
    assert await broker.remove_consumer(sub, "c1") is False  # it holds x
    assert await consumer_names(broker, topic) == ["c1"]
    # A held retry keeps it too (on Redis: in the group's retry stream, not the topic's).
    await broker.retry(sub, first, 0.0)
    with anyio.fail_after(5):
        [retried] = await broker.fetch(sub, "c1", 10, 2.0)
    assert await broker.remove_consumer(sub, "c1") is False
    assert await broker.reclaim(sub, "c2", 0.0, 10) != []  # still pending, never dropped
    assert await broker.remove_consumer(sub, "c1") is True  # c2 holds it now
    assert await consumer_names(broker, topic) == ["c2"]
    await broker.ack(sub, [retried])
    assert await broker.remove_consumer(sub, "c2") is True
    assert await consumer_names(broker, topic) == []
    assert await broker.remove_consumer(sub, "never-seen") is True


async def test_prune_removes_idle_consumers_that_hold_nothing(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"1"), (topic, b"2")])
    [held] = await broker.fetch(sub, "holder", 1, 0.5)
    [done] = await broker.fetch(sub, "gone", 1, 0.5)
    await broker.ack(sub, [done])
    assert await broker.prune_consumers(sub, 60.0) == []  # nobody idle that long
    with anyio.fail_after(5):
        while not (removed := await broker.prune_consumers(sub, 0.2)):
            await anyio.sleep(0.05)
    assert removed == ["gone"]
    assert await consumer_names(broker, topic) == ["holder"]
    [taken] = await broker.reclaim(sub, "other", 0.0, 10)  # the holder's delivery is intact
    assert taken.data == held.data


async def test_prune_spares_the_consumers_of_live_workers(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"1"), (topic, b"2")])
    for name in ("alive", "dead"):
        await broker.ack(sub, await broker.fetch(sub, name, 1, 0.5))

    async def alive(name: str) -> bool:
        return name == "alive"

    with anyio.fail_after(5):
        while not (removed := await broker.prune_consumers(sub, 0.2, alive=alive)):
            await anyio.sleep(0.05)
    assert removed == ["dead"]
    assert await consumer_names(broker, topic) == ["alive"]


async def test_ack_is_idempotent(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish(topic, b"x")
    deliveries = await broker.fetch(sub, "c", 10, 0.5)
    await broker.ack(sub, deliveries)
    await broker.ack(sub, deliveries)
    await anyio.sleep(0.05)
    assert await broker.reclaim(sub, "c2", 0.0, 10) == []


async def test_fetch_hands_out_at_most_count(broker: Broker, topic: str) -> None:
    sub = Subscription(topic, "g")
    await broker.subscribe(sub)
    await broker.publish_many([(topic, b"x")] * 5)
    assert len(await broker.fetch(sub, "c", 2, 0.5)) == 2
    assert len(await broker.fetch(sub, "c", 2, 0.5)) == 2
    assert len(await broker.fetch(sub, "c", 2, 0.5)) == 1


async def test_url_hides_passwords(broker: Broker) -> None:
    assert "@" not in broker.url or "***@" in broker.url  # a password, or a NATS token
