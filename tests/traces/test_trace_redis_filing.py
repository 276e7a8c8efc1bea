"""How Redis files a worker's attempt records (one document and one script a batch), on a real
redis-server: past a run's bound a batch's new records are dropped together, counted, while
an attempt's end still replaces its start; any event finds its run; the records of a run
are read back exactly as a worker encodes them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
import redis

from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.brokers.redis._traces import BatchCache
from omnidaemon.brokers.traces import Attempts, TraceWrite, encode_attempt
from omnidaemon.traces.records import decode_record

pytestmark = pytest.mark.anyio

CREATED = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


PREFIX = f"tf{uuid4().hex[:8]}"


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    async with RedisBroker(redis_url, prefix=PREFIX) as b:
        yield b


def row(
    run: str, event: str, outcome: str = "running", ended: float | None = None, attempt: int = 1
) -> Any:
    return (
        run,
        event,
        "doc.uploaded",
        None,
        CREATED,
        "app",
        attempt,
        1.5,
        ended,
        outcome,
        None,
        None,
        None,
    )


def write(
    rows: list[Any],
    *,
    replacing: dict[str, int] | None = None,
    bound: int = 2,
    agent: str = "extract",
) -> TraceWrite:
    attempts = Attempts(agent, "w1", rows, replacing or {})
    pointers = [(r[1], r[0]) for r in rows if r[1] != r[0]]
    return TraceWrite((), pointers, 60, bound, time.time(), attempts)


async def test_past_the_bound_new_records_are_dropped_and_an_end_still_replaces_its_start(
    broker: RedisBroker,
) -> None:
    sub = Subscription(f"t-{uuid4().hex[:8]}", "extract")
    await broker.subscribe(sub)
    run = f"run-{uuid4().hex[:8]}"
    starts = [row(run, f"e{i}") for i in range(3)]
    await broker.ack(sub, [], trace=write(starts))  # within the unchecked records: all kept
    await broker.ack(sub, [], trace=write([row(run, f"x{i}") for i in range(30)]))  # past it
    end = row(run, "e0", "succeeded", 2.5)
    more = [row(run, f"y{i}") for i in range(5)]
    await broker.ack(sub, [], trace=write([end, *more], replacing={run: 1}))
    stored = await broker.read_trace(run)
    assert stored is not None
    assert set(stored.records) == {"e0|extract|1", "e1|extract|1", "e2|extract|1"}
    assert stored.records["e0|extract|1"] == encode_attempt("extract", "w1", end)[2]
    decoded = decode_record(stored.records["e0|extract|1"])
    assert decoded is not None and decoded["outcome"] == "succeeded" and decoded["ended"] == 2.5
    assert stored.dropped == 35  # 30, then the 5 new ones of the last batch
    assert await broker.run_of("e1") == run and await broker.run_of("y0") == run
    assert await broker.run_of(f"nothing-{uuid4().hex[:6]}") is None


async def test_the_bound_holds_what_a_run_grows_by_and_keeps_its_first_events_records(
    broker: RedisBroker,
) -> None:
    await _the_bound_holds_what_a_run_grows_by(broker)


async def test_on_a_cluster_the_bound_holds_what_a_run_grows_by(cluster_url: str) -> None:
    # The records are split by shard there (16 on a cluster), each part counted on its own.
    async with RedisBroker(cluster_url, prefix=PREFIX) as broker:
        await _the_bound_holds_what_a_run_grows_by(broker)


async def _the_bound_holds_what_a_run_grows_by(broker: RedisBroker) -> None:
    # A run grows by the events its handlers publish and by retries. The first attempts at
    # its first event, one per agent of the topic, never make it a run whose bound is checked.
    sub = Subscription(f"t-{uuid4().hex[:8]}", "extract")
    await broker.subscribe(sub)
    run = f"run-{uuid4().hex[:8]}"
    for n in range(40):  # 40 agents on the first event's topic, bound 2: all kept
        await broker.ack(sub, [], trace=write([row(run, run, "succeeded", 2.0)], agent=f"a{n}"))
    await broker.ack(sub, [], trace=write([row(run, f"c{i}") for i in range(40)]))  # grows
    stored = await broker.read_trace(run)
    assert stored is not None and len(stored.records) == 40 and stored.dropped == 40
    assert all(name.startswith(f"{run}|a") for name in stored.records)
    # Retries of the first event count: 40 of them make another run one that is checked.
    other = f"run-{uuid4().hex[:8]}"
    retries = [row(other, other, "retrying", 2.0, attempt) for attempt in range(1, 41)]
    await broker.ack(sub, [], trace=write(retries))
    stored = await broker.read_trace(other)
    assert stored is None or stored.dropped > 0


async def test_a_server_without_the_script_still_takes_the_batch(broker: RedisBroker) -> None:
    # The script goes by its digest; a server that lost it (restarted, or a new master after
    # a failover) refuses it whole, and the batch goes again with the script's text.
    sub = Subscription(f"t-{uuid4().hex[:8]}", "extract")
    await broker.subscribe(sub)
    first, second = f"run-{uuid4().hex[:8]}", f"run-{uuid4().hex[:8]}"
    await broker.ack(sub, [], trace=write([row(first, first, "succeeded", 2.0)]))
    await broker._direct(("SCRIPT", "FLUSH"), key="any", timeout=5)
    await broker.ack(sub, [], trace=write([row(second, second, "succeeded", 2.0)]))
    for run in (first, second):
        stored = await broker.read_trace(run)
        assert stored is not None and list(stored.records) == [f"{run}|extract|1"]


def _mget_calls(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


def _lookups(redis_url: str) -> int:
    """Keys the server has looked up for reads (found or not)."""
    with redis.Redis.from_url(redis_url) as client:
        stats: dict[str, Any] = client.info("stats")
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


async def test_a_run_read_again_fetches_only_the_batches_written_since(
    broker: RedisBroker, redis_url: str
) -> None:
    # What `trace --follow` and the dashboard do: read one run again and again. Its batches
    # never change once written, so a reader fetches each once.
    sub = Subscription(f"t-{uuid4().hex[:8]}", "extract")
    await broker.subscribe(sub)
    run = f"run-{uuid4().hex[:8]}"
    for i in range(5):
        await broker.ack(sub, [], trace=write([row(run, f"e{i}", "succeeded", 2.0)], bound=100))
    first = await broker.read_trace(run)
    assert first is not None and len(first.records) == 5
    calls, lookups = _mget_calls(redis_url), _lookups(redis_url)
    assert await broker.read_trace(run) == first
    assert _mget_calls(redis_url) == calls  # no batch fetched again
    again = _lookups(redis_url) - lookups  # the directories alone
    await broker.ack(sub, [], trace=write([row(run, "e5", "succeeded", 2.0)], bound=100))
    calls, lookups = _mget_calls(redis_url), _lookups(redis_url)
    third = await broker.read_trace(run)
    assert third is not None and set(third.records) == {f"e{i}|extract|1" for i in range(6)}
    assert _mget_calls(redis_url) == calls + 1
    assert _lookups(redis_url) - lookups == again + 1  # the new batch alone
    # Another reader (no cache) reads the same.
    async with RedisBroker(redis_url, prefix=PREFIX) as fresh:
        assert await fresh.read_trace(run) == third


def test_the_batch_cache_is_bounded_in_bytes_and_time() -> None:
    # Each batch counts its bytes, its key's and about 200 for its entry.
    cache = BatchCache(max_bytes=2 * 201 + 10, ttl=60)
    cache.put("a", b"12345", 0)
    cache.put("b", b"12345", 0)
    assert cache.get("a", 1) == b"12345"  # used: "b" is now the least recently used
    cache.put("c", b"123", 1)
    assert cache.get("b", 1) is None and cache.get("a", 1) == b"12345"
    assert cache.get("c", 1) == b"123"
    assert cache.get("a", 61) is None  # read from the bus too long ago: read it again
    cache.put("big", b"x" * 500, 1)  # larger than the whole cache: not kept
    assert cache.get("big", 1) is None and cache.get("c", 1) == b"123"
