"""Delivery semantics of the worker (DESIGN.md section 4), on the in-memory bus."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from omnidaemon import App, Backoff, Context, Reject, Retry
from omnidaemon.brokers import MemoryBroker, Subscription
from omnidaemon.envelope import Envelope, dumps
from omnidaemon.testing import TestApp
from omnidaemon.worker import Worker

pytestmark = pytest.mark.anyio


class Order(BaseModel):
    order_id: str
    amount: int


class Receipt(BaseModel):
    order_id: str
    total: int


def new_app() -> App:
    return App("shop", broker=MemoryBroker(None))


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def test_async_and_sync_handlers_both_run() -> None:
    app = new_app()
    seen: list[tuple[str, str]] = []

    @app.agent("order.placed")
    async def async_agent(event: Order) -> None:
        seen.append(("async", event.order_id))

    @app.agent("order.placed")
    def sync_agent(event: Order, ctx: Context) -> None:
        seen.append(("sync", event.order_id))

    async with TestApp(app) as bus:
        await bus.publish("order.placed", Order(order_id="o1", amount=3))
        await bus.drain()
    assert sorted(seen) == [("async", "o1"), ("sync", "o1")]


async def test_invalid_payload_is_dead_lettered_at_once_with_the_error() -> None:
    app = new_app()
    calls: list[Order] = []

    @app.agent("order.placed", max_retries=5)
    async def charge(event: Order) -> None:
        calls.append(event)

    async with TestApp(app) as bus:
        # Another program, which does not know the agent's type, publishes a wrong payload.
        elsewhere = App("elsewhere", broker=bus.broker)
        event_id = await elsewhere.publish("order.placed", {"order_id": "o1", "amount": "lots"})
        await bus.publish("order.placed", {"order_id": "o2", "amount": 2})
        await bus.drain()
        [letter] = bus.dead_letters("charge")
    assert [c.order_id for c in calls] == ["o2"]  # the loop went on after the bad one
    assert letter.error_type == "PayloadValidationError"
    assert "amount" in letter.error_message
    assert letter.attempts == 1
    assert letter.event_id == event_id
    assert letter.payload == {"order_id": "o1", "amount": "lots"}


async def test_reject_dead_letters_without_retrying() -> None:
    app = new_app()
    attempts: list[int] = []

    @app.agent("order.placed", max_retries=3)
    async def charge(event: Order, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Reject("card declined")

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        [letter] = bus.dead_letters("charge")
    assert attempts == [1]
    assert (letter.error_type, letter.error_message) == ("Reject", "card declined")


async def test_failures_are_retried_then_dead_lettered_with_traceback() -> None:
    app = new_app()
    attempts: list[int] = []

    @app.agent("order.placed", max_retries=3)
    async def charge(event: Order, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("payment gateway down")

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        [letter] = bus.dead_letters("charge")
    assert attempts == [1, 2, 3, 4]  # the first try plus max_retries retries
    assert letter.attempts == 4
    assert letter.error_type == "ConnectionError"
    assert letter.error_message == "payment gateway down"
    assert letter.traceback is not None and "payment gateway down" in letter.traceback


async def test_max_retries_zero_dead_letters_on_first_failure() -> None:
    app = new_app()

    @app.agent("order.placed", max_retries=0)
    async def charge(event: Order) -> None:
        raise RuntimeError("nope")

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        assert [d.attempts for d in bus.dead_letters("charge")] == [1]


async def test_retry_then_success_is_acknowledged_once() -> None:
    app = new_app()
    attempts: list[int] = []

    @app.agent("order.placed", publishes="order.charged")
    async def charge(event: Order, ctx: Context) -> Receipt:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise Retry(delay=5, reason="gateway busy")
        return Receipt(order_id=event.order_id, total=event.amount)

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        assert bus.dead_letters("charge") == []
        assert [e.payload for e in bus.published("order.charged")] == [
            {"order_id": "o1", "total": 2}
        ]
    assert attempts == [1, 2, 3]


async def test_retry_delay_and_backoff_are_waited_out() -> None:
    app = new_app()
    starts: list[float] = []

    @app.agent(
        "order.placed",
        max_retries=2,
        retry_backoff=Backoff(initial=0.2, factor=2, jitter=False),
    )
    async def charge(event: Order) -> None:
        starts.append(anyio.current_time())
        raise RuntimeError("flaky")

    async with TestApp(app, fast_retries=False) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        assert len(bus.dead_letters("charge")) == 1
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2
    assert gaps[0] >= 0.19  # initial
    assert gaps[1] >= 0.39  # initial * factor


async def test_retry_of_one_agent_is_not_redelivered_to_another() -> None:
    app = new_app()
    calls = {"flaky": 0, "steady": 0}

    @app.agent("order.placed", max_retries=2)
    async def flaky(event: Order) -> None:
        calls["flaky"] += 1
        raise RuntimeError("always")

    @app.agent("order.placed")
    async def steady(event: Order) -> None:
        calls["steady"] += 1

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
    assert calls == {"flaky": 3, "steady": 1}


async def test_handler_timeout_counts_as_a_failure() -> None:
    app = new_app()

    @app.agent("order.placed", timeout=0.05, max_retries=1)
    async def slow(event: Order) -> None:
        await anyio.sleep(30)

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        [letter] = bus.dead_letters("slow")
    assert (letter.error_type, letter.attempts) == ("TimeoutError", 2)


async def test_timed_out_sync_handlers_keep_their_slots_until_their_threads_end() -> None:
    # A thread cannot be stopped: a timed-out plain `def` handler's thread runs on. Its
    # attempt is settled at once, but its slot stays taken until the thread returns, so such
    # threads never make more than `concurrency` (issue 14 saw 16 with concurrency=2).
    app = new_app()
    lock = threading.Lock()
    release = threading.Event()
    running = peak = 0
    attempts: list[tuple[str, int]] = []

    @app.agent(
        "order.placed",
        concurrency=2,
        timeout=0.2,
        max_retries=1,
        retry_backoff=Backoff(initial=0.01, jitter=False),
        store_results=True,
    )
    def charge(event: Order, ctx: Context) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            attempts.append((ctx.event_id, ctx.attempt))
        try:
            release.wait(30)
        finally:
            with lock:
                running -= 1

    async def statuses(ids: list[str]) -> list[str]:
        return [(await app.result(i)).status for i in ids]

    async with TestApp(app) as bus:
        try:
            ids = [
                await bus.publish("order.placed", {"order_id": f"o{i}", "amount": i})
                for i in range(10)
            ]
            # Both first attempts time out and are settled (a retry is scheduled for each)
            # while their threads still block.
            with anyio.fail_after(5):
                while await statuses(ids[:2]) != ["retrying", "retrying"]:
                    await anyio.sleep(0.01)
            assert running == 2
            # The two threads hold both slots: neither the 8 unread events nor the 2 retries,
            # due by now, start. Watched for 3 timeouts: the bug started 2 more in each.
            with anyio.move_on_after(0.6):
                await wait_for(lambda: len(attempts) > 2)
            assert (peak, running, sorted(attempts)) == (2, 2, sorted([(ids[0], 1), (ids[1], 1)]))
            assert bus.broker.has_scheduled()
        finally:
            release.set()  # the threads end: their slots come back
        await bus.drain()
        later = await bus.publish("order.placed", {"order_id": "later", "amount": 1})
        await bus.drain()
        assert await statuses([*ids, later]) == ["succeeded"] * 11
        assert not bus.dead_letters("charge")
    assert peak == 2
    assert sorted(attempts) == sorted([*((i, 1) for i in [*ids, later]), (ids[0], 2), (ids[1], 2)])


async def test_fan_out_gives_each_agent_every_event() -> None:
    app = new_app()
    seen: dict[str, list[str]] = {"inventory": [], "payment": [], "shipping": []}

    for name in seen:

        @app.agent("order.placed", name=name)
        async def handle(event: Order, ctx: Context) -> None:
            seen[ctx.agent].append(event.order_id)

    async with TestApp(app) as bus:
        for i in range(5):
            await bus.publish("order.placed", {"order_id": f"o{i}", "amount": i})
        await bus.drain()
    expected = [f"o{i}" for i in range(5)]
    assert {name: sorted(ids) for name, ids in seen.items()} == dict.fromkeys(seen, expected)


async def test_instances_of_one_agent_share_its_events() -> None:
    app = new_app()
    running = 0
    both_running = anyio.Event()
    handled: list[str] = []

    @app.agent("order.placed", concurrency=1)
    async def charge(event: Order) -> None:
        nonlocal running
        running += 1
        if running == 2:
            both_running.set()
        with anyio.fail_after(5):  # only two workers sharing the load can get here twice
            await both_running.wait()
        handled.append(event.order_id)

    async with Worker(app).started(), Worker(app).started():
        await app.publish("order.placed", {"order_id": "o1", "amount": 1})
        await app.publish("order.placed", {"order_id": "o2", "amount": 2})
        await wait_for(lambda: len(handled) == 2)
    assert sorted(handled) == ["o1", "o2"]  # each exactly once


async def test_causation_and_correlation_propagate() -> None:
    app = new_app()

    @app.agent("order.placed", publishes="order.charged")
    async def charge(event: Order, ctx: Context) -> Receipt:
        await ctx.publish("audit.logged", {"what": "charge", "order_id": event.order_id})
        return Receipt(order_id=event.order_id, total=event.amount)

    async with TestApp(app) as bus:
        first = await bus.publish(
            "order.placed",
            {"order_id": "o1", "amount": 2},
            correlation_id="req-42",
            tenant_id="acme",
        )
        await bus.drain()
        [charged] = bus.published("order.charged")
        [audit] = bus.published("audit.logged")
    for child in (charged, audit):
        assert child.causation_id == first
        assert child.correlation_id == "req-42"
        assert child.tenant_id == "acme"
        assert child.source == "shop"
        assert child.id != first


async def test_correlation_defaults_to_the_first_event_id() -> None:
    app = new_app()

    @app.agent("order.placed", publishes="order.charged")
    async def charge(event: Order) -> Receipt:
        return Receipt(order_id=event.order_id, total=event.amount)

    async with TestApp(app) as bus:
        first = await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        [placed] = bus.published("order.placed")
        [charged] = bus.published("order.charged")
    assert placed.correlation_id == first == charged.correlation_id


async def test_return_value_is_validated_before_it_is_published() -> None:
    app = new_app()

    @app.agent("order.placed", publishes="order.charged")
    async def from_dict(event: Order) -> Receipt:
        return {"order_id": event.order_id, "total": str(event.amount)}  # type: ignore[return-value]

    @app.agent("order.placed", publishes="order.broken", max_retries=3)
    async def broken(event: Order) -> Receipt:
        return {"order_id": event.order_id}  # type: ignore[return-value]

    @app.agent("order.placed", publishes="order.maybe")
    async def maybe(event: Order) -> Receipt | None:
        return None

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 2})
        await bus.drain()
        assert [e.payload for e in bus.published("order.charged")] == [
            {"order_id": "o1", "total": 2}
        ]
        assert bus.published("order.broken") == []
        [letter] = bus.dead_letters("broken")
        assert letter.error_type == "ReturnValidationError"
        assert letter.attempts == 1  # a contract violation is not retried
        assert "total" in letter.error_message
        assert bus.published("order.maybe") == []
        assert bus.dead_letters("maybe") == []


@dataclass
class Point:
    x: int
    y: int


async def test_dataclass_payloads_and_returns() -> None:
    app = new_app()

    @app.agent("point.created", publishes="point.moved")
    def move(event: Point) -> Point:
        return Point(event.x + 1, event.y + 1)

    async with TestApp(app) as bus:
        await bus.publish("point.created", Point(1, 2))
        await bus.drain()
        assert [e.payload for e in bus.published("point.moved")] == [{"x": 2, "y": 3}]


async def test_reply_to_receives_the_return_value() -> None:
    app = new_app()

    @app.agent("quote.requested")
    async def quote(event: dict[str, Any]) -> dict[str, Any]:
        return {"price": event["qty"] * 3}

    async with TestApp(app) as bus:
        request = await bus.publish(
            "quote.requested", {"qty": 2}, reply_to="quote.replied", correlation_id="c-1"
        )
        await bus.drain()
        [reply] = bus.published("quote.replied")
    assert reply.payload == {"price": 6}
    assert (reply.causation_id, reply.correlation_id) == (request, "c-1")


async def test_concurrency_bounds_handlers_and_fetching() -> None:
    app = new_app()
    running = 0
    peak = 0
    release = anyio.Event()

    @app.agent("order.placed", concurrency=2)
    async def charge(event: Order) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    async with TestApp(app) as bus:
        for i in range(6):
            await bus.publish("order.placed", {"order_id": f"o{i}", "amount": i})
        await wait_for(lambda: running == 2)
        await anyio.wait_all_tasks_blocked()
        sub = Subscription("order.placed", "charge")
        # Only as many entries were fetched as there are free slots: the rest are unread.
        assert bus.broker.pending(sub) == 2
        assert running == 2
        release.set()
        await bus.drain()
    assert peak == 2


async def test_undecodable_entries_are_dead_lettered_and_the_loop_goes_on() -> None:
    app = new_app()
    handled: list[str] = []

    @app.agent("order.placed")
    async def charge(event: Order) -> None:
        handled.append(event.order_id)

    future = Envelope.new("order.placed", {"order_id": "x", "amount": 1}).model_copy(
        update={"v": 2}
    )
    async with TestApp(app) as bus:
        await bus.broker.publish("order.placed", b"this is not json")
        await bus.broker.publish("order.placed", b"\xff\xfe\x00garbage")
        await bus.broker.publish("order.placed", dumps({"v": 1, "topic": "order.placed"}))
        await bus.broker.publish("order.placed", future.encode())
        await bus.publish("order.placed", {"order_id": "good", "amount": 1})
        await bus.drain()
        letters = bus.dead_letters("charge")
    assert handled == ["good"]
    assert [d.error_type for d in letters] == [
        "MalformedEnvelope",
        "MalformedEnvelope",
        "MalformedEnvelope",
        "UnsupportedVersion",
    ]
    assert letters[0].entry == "this is not json"
    assert letters[0].event_id is None
    assert "upgrade" in letters[3].error_message


async def test_lifespan_and_hooks_run_in_order() -> None:
    from contextlib import asynccontextmanager

    order: list[str] = []

    @asynccontextmanager
    async def lifespan(app: App) -> Any:
        order.append("lifespan enter")
        yield
        order.append("lifespan exit")

    app = App("hooks", broker=MemoryBroker(None), lifespan=lifespan)

    @app.on_startup
    async def start() -> None:
        order.append("startup")

    @app.on_shutdown
    async def stop() -> None:
        order.append("shutdown")

    @app.agent("order.placed")
    async def charge(event: Order) -> None:
        order.append("handled")

    async with TestApp(app) as bus:
        await bus.publish("order.placed", {"order_id": "o1", "amount": 1})
        await bus.drain()
    assert order == ["lifespan enter", "startup", "handled", "shutdown", "lifespan exit"]


async def test_sync_handlers_publish_with_publish_sync() -> None:
    app = new_app()

    @app.agent("order.placed")
    def charge(event: Order, ctx: Context) -> None:
        ctx.publish_sync("order.charged", {"order_id": event.order_id})

    async with TestApp(app) as bus:
        first = await bus.publish("order.placed", {"order_id": "o1", "amount": 1})
        await bus.drain()
        [charged] = bus.published("order.charged")
    assert charged.payload == {"order_id": "o1"}
    assert charged.causation_id == first
