"""Output logs (`Broker.append_output`, `read_output`, `delete_output`) on every broker.

What streamed partial output rests on: a handler appends, any number of readers read the log
from its start at their own pace, a waiting reader is woken by an append, and the bus drops
the log after its TTL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from uuid import uuid4

import anyio
import pytest

from omnidaemon.brokers import Broker, MemoryBroker
from tests.conformance.test_broker_contract import BROKERS  # the same buses, one list

pytestmark = pytest.mark.anyio


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with BROKERS[request.param](request) as b:
        yield b


@pytest.fixture
def key() -> str:
    return f"ev-{uuid4().hex[:12]}:out"


async def append_all(broker: Broker, key: str, datas: list[bytes]) -> list[str]:
    return [await broker.append_output(key, data, ttl=60) for data in datas]


async def test_entries_read_back_in_order_after_any_id(broker: Broker, key: str) -> None:
    ids = await append_all(broker, key, [b"a", b"b", b"c"])
    assert len(set(ids)) == 3
    assert await broker.read_output(key) == list(zip(ids, [b"a", b"b", b"c"], strict=True))
    assert await broker.read_output(key, after=ids[0]) == [(ids[1], b"b"), (ids[2], b"c")]
    assert await broker.read_output(key, after=ids[1]) == [(ids[2], b"c")]
    assert await broker.read_output(key, after=ids[2]) == []
    assert await broker.read_output(key, count=2) == [(ids[0], b"a"), (ids[1], b"b")]


async def test_readers_each_read_everything_at_their_own_pace(broker: Broker, key: str) -> None:
    datas = [f"chunk {i}".encode() for i in range(7)]
    await append_all(broker, key, datas)

    async def read_all(count: int) -> list[bytes]:
        got: list[tuple[str, bytes]] = []
        while batch := await broker.read_output(
            key, after=got[-1][0] if got else None, count=count
        ):
            got += batch
        return [data for _, data in got]

    results: dict[int, list[bytes]] = {}

    async def reader(count: int) -> None:
        results[count] = await read_all(count)

    async with anyio.create_task_group() as tasks:
        for count in (1, 3, 100):
            tasks.start_soon(reader, count)
    assert results == {1: datas, 3: datas, 100: datas}


async def test_a_waiting_reader_is_woken_by_an_append(broker: Broker, key: str) -> None:
    first = await broker.append_output(key, b"first", ttl=60)
    woken: list[tuple[float, list[tuple[str, bytes]]]] = []

    async def reader() -> None:
        found = await broker.read_output(key, after=first, timeout=5)
        woken.append((anyio.current_time(), found))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(reader)
        # Give the reader a moment to start waiting (the test holds either way: a reader that
        # had not started yet finds the entry at once).
        await anyio.sleep(0.2)
        assert not woken  # nothing after `first` yet: it waits
        appended_at = anyio.current_time()
        second = await broker.append_output(key, b"second", ttl=60)
        with anyio.fail_after(4):
            while not woken:
                await anyio.sleep(0.005)
    returned_at, found = woken[0]
    assert found == [(second, b"second")]
    assert returned_at - appended_at < 0.8


async def test_a_waiting_reader_of_a_missing_log_times_out_empty(broker: Broker, key: str) -> None:
    assert await broker.read_output(key) == []
    started = anyio.current_time()
    assert await broker.read_output(key, timeout=0.3) == []
    assert anyio.current_time() - started < 3


async def test_deleted_log_reads_empty_and_starts_again(broker: Broker, key: str) -> None:
    await append_all(broker, key, [b"a", b"b"])
    await broker.delete_output(key)
    assert await broker.read_output(key) == []
    await broker.delete_output(key)  # idempotent
    await broker.delete_output(f"{key}-never-written")
    again = await broker.append_output(key, b"new", ttl=60)
    assert await broker.read_output(key) == [(again, b"new")]


@pytest.mark.parametrize("after", ["", "nope", "-1", "1-2-3", "12 ", "0x10", "1e3", "١٢"])
async def test_an_id_of_no_bus_raises(broker: Broker, key: str, after: str) -> None:
    await broker.append_output(key, b"a", ttl=60)
    with pytest.raises(ValueError):
        await broker.read_output(key, after=after)


async def test_count_below_one_raises(broker: Broker, key: str) -> None:
    with pytest.raises(ValueError):
        await broker.read_output(key, count=0)


async def test_large_entries_come_back_intact(broker: Broker, key: str) -> None:
    big = os.urandom(256 * 1024)
    binary = bytes(range(256)) * 4
    ids = await append_all(broker, key, [big, binary, b""])
    assert await broker.read_output(key) == list(zip(ids, [big, binary, b""], strict=True))


async def test_the_log_expires_after_its_ttl(broker: Broker, key: str) -> None:
    if isinstance(broker, MemoryBroker):
        await broker.append_output(key, b"a", ttl=10)
        broker.advance(6)
        await broker.append_output(key, b"b", ttl=10)  # the log lives 10 s from here
        broker.advance(6)
        assert [d for _, d in await broker.read_output(key)] == [b"a", b"b"]
        broker.advance(5)
        assert await broker.read_output(key) == []
        return
    # Real buses, on their own clocks: NATS counts whole seconds (at least one).
    ttl = 1.0 if "Nats" in type(broker).__name__ else 0.3
    await broker.append_output(key, b"a", ttl=ttl)
    assert [d for _, d in await broker.read_output(key)] == [b"a"]
    with anyio.fail_after(ttl + 5):
        while await broker.read_output(key):
            await anyio.sleep(0.05)
