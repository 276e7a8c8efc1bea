"""The trace store (`Broker.ack(..., trace=)`, `read_trace`, `run_of`, `recent_runs`) on every
broker: what `omnidaemon trace` and `omnidaemon runs` read."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import anyio
import pytest

from omnidaemon.brokers import Broker, MemoryBroker, Subscription
from omnidaemon.brokers.redis._trace_writes import RedisTraceWrites
from omnidaemon.brokers.traces import StoredTrace, TraceWrite
from tests.conformance.test_broker_contract import BROKERS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=sorted(BROKERS))
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with BROKERS[request.param](request) as b:
        yield b


@pytest.fixture
async def sub(broker: Broker) -> Subscription:
    sub = Subscription(f"t-{uuid4().hex[:8]}", "agent")
    await broker.subscribe(sub)
    return sub


def run_id() -> str:
    return f"run-{uuid4().hex[:12]}"


def write(
    records: dict[str, dict[str, bytes]],
    pointers: dict[str, str] | None = None,
    *,
    ttl: float = 60,
    max_records: int = 100,
    now: float | None = None,
) -> TraceWrite:
    flat = [(run, name, data) for run, fields in records.items() for name, data in fields.items()]
    return TraceWrite(
        flat,
        list((pointers or {}).items()),
        ttl,
        max_records,
        time.time() if now is None else now,
    )


async def test_records_are_stored_with_the_ack_and_replaced_by_field(
    broker: Broker, sub: Subscription
) -> None:
    run = run_id()
    await broker.publish(sub.topic, b"e")
    [delivery] = await broker.fetch(sub, "c1", 10, 1.0)
    start = write({run: {"e1|a|1": b'{"o":"running"}', "e2|a|1": b"x"}})
    await broker.ack(sub, [], trace=start)
    end = write({run: {"e1|a|1": b'{"o":"succeeded"}'}})
    await broker.ack(sub, [delivery], trace=end)
    assert await broker.read_trace(run) == StoredTrace(
        {"e1|a|1": b'{"o":"succeeded"}', "e2|a|1": b"x"}, 0
    )
    assert await broker.fetch(sub, "c2", 10, 0.05) == []  # the ack settled the delivery
    assert await broker.read_trace(run_id()) is None


async def test_of_writes_made_in_the_same_millisecond_the_last_wins(
    broker: Broker, sub: Subscription, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On Redis a batch's ref ends with its writer's count of batches: 8, 9, 10, 11 here, so
    # the tenth must not be read before the ninth (as text, "10" < "9").
    monkeypatch.setattr(RedisTraceWrites, "_trace_batches", itertools.count(8))
    run, now = run_id(), time.time()
    for i in range(4):
        await broker.ack(sub, [], trace=write({run: {"f": b"%d" % i}}, now=now))
    assert await broker.read_trace(run) == StoredTrace({"f": b"3"}, 0)


async def test_the_last_record_of_a_field_in_one_write_wins(
    broker: Broker, sub: Subscription
) -> None:
    run = run_id()
    records = [(run, "f", b"start"), (run, "g", b"x"), (run, "f", b"end")]
    await broker.ack(sub, [], trace=TraceWrite(records, [], 60, 100, time.time()))
    assert await broker.read_trace(run) == StoredTrace({"f": b"end", "g": b"x"}, 0)


async def test_many_runs_and_pointers_in_one_write(broker: Broker, sub: Subscription) -> None:
    runs = [run_id() for _ in range(5)]
    records = {run: {f"{run}-child|a|1": run.encode(), f"{run}|a|1": b"root"} for run in runs}
    pointers = {f"{run}-child": run for run in runs}
    await broker.ack(sub, [], trace=write(records, pointers))
    for run in runs:
        stored = await broker.read_trace(run)
        assert stored is not None and stored.records == records[run]
        assert await broker.run_of(f"{run}-child") == run
    assert await broker.run_of(f"{uuid4()}") is None


UNCHECKED = 32  # records a process may write to a run before a bus checks the bound (Redis)


async def test_a_run_keeps_at_most_max_records_and_counts_the_rest(
    broker: Broker, sub: Subscription
) -> None:
    run = run_id()
    await broker.ack(sub, [], trace=write({run: {f"f{i}": b"1" for i in range(3)}}, max_records=4))
    for batch in range(10):  # 100 new fields, 10 a write, from this one process
        fields = {f"g{batch}-{i}": b"2" for i in range(10)}
        await broker.ack(sub, [], trace=write({run: fields}, max_records=4))
    # A field already stored is replaced whatever the bound.
    await broker.ack(sub, [], trace=write({run: {"f0": b"end"}}, max_records=4))
    stored = await broker.read_trace(run)
    assert stored is not None and stored.records["f0"] == b"end"
    assert 4 <= len(stored.records) <= 4 + UNCHECKED
    assert len(stored.records) + stored.dropped == 103  # every record kept or counted
    if isinstance(broker, MemoryBroker):
        assert len(stored.records) == 4


async def test_recent_runs_newest_first_since_a_time(broker: Broker, sub: Subscription) -> None:
    old, middle, new = run_id(), run_id(), run_id()
    ours = {old, middle, new}
    base = time.time()
    await broker.ack(sub, [], trace=write({old: {"f": b"x"}}, now=base))
    await broker.ack(sub, [], trace=write({middle: {"f": b"x"}, new: {"f": b"x"}}, now=base + 0.01))
    await broker.ack(sub, [], trace=write({new: {"g": b"y"}}, now=base + 0.02))  # written again
    # Other tests write runs to a shared bus meanwhile: look at ours only.
    got = [(r, t) for r, t in await broker.recent_runs(since=base, limit=10_000) if r in ours]
    assert [(r, round(t, 3)) for r, t in got] == [
        (new, round(base + 0.02, 3)),
        (middle, round(base + 0.01, 3)),
        (old, round(base, 3)),
    ]
    later = await broker.recent_runs(since=base + 0.005, limit=10_000)
    assert [r for r, _ in later if r in ours] == [new, middle]
    assert len(await broker.recent_runs(since=base, limit=2)) == 2
    assert await broker.recent_runs(since=base, limit=0) == []


async def test_a_run_expires_its_ttl_after_its_last_write(
    broker: Broker, sub: Subscription
) -> None:
    run = run_id()
    if isinstance(broker, MemoryBroker):
        await broker.ack(sub, [], trace=write({run: {"a": b"1"}}, {"child": run}, ttl=10))
        broker.advance(6)
        await broker.ack(sub, [], trace=write({run: {"b": b"2"}}, ttl=10))
        broker.advance(6)
        stored = await broker.read_trace(run)
        assert stored is not None and set(stored.records) == {"a", "b"}
        assert await broker.run_of("child") is None  # its pointer was written 12 s ago
        broker.advance(5)
        assert await broker.read_trace(run) is None
        return
    ttl = 1.0 if "Nats" in type(broker).__name__ else 0.3
    child = f"child-{uuid4().hex[:8]}"
    await broker.ack(sub, [], trace=write({run: {"a": b"1"}}, {child: run}, ttl=ttl))
    assert await broker.read_trace(run) is not None
    with anyio.fail_after(ttl + 5):
        while await broker.read_trace(run) is not None or await broker.run_of(child):
            await anyio.sleep(0.05)
