"""Delivery semantics (DESIGN.md section 4) through real workers, on every broker.

Each broker joins by adding a factory to `BROKERS`. Worker processes are exercised in
`test_worker_processes.py`; here workers run in the test's event loop. The embedded bus is
the Redis broker on a local Valkey (`test_broker_contract.py` and `test_inspection.py` run
it): it is left out here, for the suite's time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import uuid4

import anyio
import pytest
from pydantic import BaseModel

from omnidaemon import App, Backoff, Context, Reject, Retry
from omnidaemon.brokers import Broker, MemoryBroker, RedisBroker, Subscription, open_broker
from omnidaemon.envelope import Envelope
from omnidaemon.worker import Worker

pytestmark = pytest.mark.anyio

# kind -> (request, bus name) -> a broker; brokers made with one bus name share one bus.
BROKERS: dict[str, Callable[[pytest.FixtureRequest, str], Broker]] = {
    "memory": lambda request, name: MemoryBroker(name),
    "redis": lambda request, name: RedisBroker(request.getfixturevalue("redis_url")),
    "cluster": lambda request, name: RedisBroker(request.getfixturevalue("cluster_url")),
    "nats": lambda request, name: open_broker(request.getfixturevalue("nats_url")),
}


class Order(BaseModel):
    order_id: str


@pytest.fixture(params=sorted(BROKERS))
def make_app(request: pytest.FixtureRequest) -> Callable[[], App]:
    """Make apps on one bus, each with its own connection, like separate processes."""
    factory, name = BROKERS[request.param], f"conformance-{uuid4().hex}"
    return lambda: App("conf", broker=factory(request, name))


@pytest.fixture
def topic() -> str:
    return f"conf{uuid4().hex[:10]}.events"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


async def wait_dead_letters(app: App, agent: str, n: int, timeout: float = 10.0) -> list[Any]:
    with anyio.fail_after(timeout):
        while len(letters := await app.dead_letters(agent)) < n:
            await anyio.sleep(0.02)
    return letters


async def test_retries_go_to_the_failing_agent_alone_with_exact_attempts(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    flaky: list[tuple[str, int]] = []
    steady: list[str] = []

    @app.agent(topic, max_retries=3, retry_backoff=Backoff(initial=0.01, jitter=False))
    async def flaky_agent(event: Order, ctx: Context) -> None:
        flaky.append((event.order_id, ctx.attempt))
        if ctx.attempt < 3:
            raise RuntimeError("try again")

    @app.agent(topic)
    async def steady_agent(event: Order) -> None:
        steady.append(event.order_id)

    async with app.running():
        for i in range(3):
            await app.publish(topic, {"order_id": f"o{i}"})
        await wait_for(lambda: len(flaky) == 9 and len(steady) == 3)
        await anyio.sleep(0.2)  # nothing more may arrive
    assert sorted(steady) == ["o0", "o1", "o2"]
    assert sorted(flaky) == sorted((f"o{i}", a) for i in range(3) for a in (1, 2, 3))


async def test_dead_letter_keeps_envelope_error_traceback_and_attempts(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()

    @app.agent(topic, max_retries=2, retry_backoff=0.01)
    async def failing(event: Order) -> None:
        raise ValueError(f"cannot handle {event.order_id}")

    @app.agent(topic)
    async def rejecting(event: Order) -> None:
        raise Reject("permanently bad")

    async with app.running():
        event_id = await app.publish(topic, {"order_id": "o1"}, correlation_id="corr")
        [failed] = await wait_dead_letters(app, "failing", 1)
        [rejected] = await wait_dead_letters(app, "rejecting", 1)
    assert failed.event_id == event_id
    assert (failed.error_type, failed.error_message) == ("ValueError", "cannot handle o1")
    assert failed.attempts == 3
    assert failed.traceback and "cannot handle o1" in failed.traceback
    assert failed.envelope is not None
    assert failed.envelope.correlation_id == "corr"
    assert failed.payload == {"order_id": "o1"}
    assert (failed.topic, failed.agent) == (topic, "failing")
    assert (rejected.error_type, rejected.attempts) == ("Reject", 1)


async def test_invalid_and_undecodable_entries_are_dead_lettered_and_the_loop_goes_on(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    handled: list[str] = []

    @app.agent(topic)
    async def strict(event: Order) -> None:
        handled.append(event.order_id)

    future = Envelope.new(topic, {"order_id": "x"}).model_copy(update={"v": 99}).encode()
    async with app.running():
        await app.broker.publish(topic, b"\xff\xfe not json")
        # Another program, which does not know the agent's type, publishes a wrong payload.
        await App("elsewhere", broker=app.broker).publish(topic, {"order_id": 42})
        await app.broker.publish(topic, future)
        await app.publish(topic, {"order_id": "good"})
        letters = await wait_dead_letters(app, "strict", 3)
        await wait_for(lambda: handled == ["good"])
    # Handled concurrently: the dead letters may be written in any order.
    assert sorted(d.error_type for d in letters) == [
        "MalformedEnvelope",
        "PayloadValidationError",
        "UnsupportedVersion",
    ]


async def test_a_crashed_consumers_delivery_is_reclaimed_with_its_attempt_counted(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    attempts: list[int] = []

    @app.agent(topic, reclaim_idle=0.3)
    async def work(event: Order, ctx: Context) -> None:
        attempts.append(ctx.attempt)

    sub = Subscription(topic, "work")
    await app.connect()
    await app.broker.subscribe(sub)
    await app.publish(topic, {"order_id": "o1"})
    assert len(await app.broker.fetch(sub, "crashed:1:1", 10, 2.0)) == 1
    async with app.running():
        await wait_for(lambda: attempts == [2])
    await app.close()


async def test_a_retry_that_was_reclaimed_keeps_counting(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    sub = Subscription(topic, "work")
    await app.connect()
    broker = app.broker
    await broker.subscribe(sub)
    await app.publish(topic, {"order_id": "o1"})
    [first] = await broker.fetch(sub, "w:1:1", 10, 2.0)
    await broker.retry(sub, first, 0.0)
    [second] = await broker.fetch(sub, "w:1:1", 10, 2.0)
    assert second.attempt == 2
    # The worker holding the retry dies; another takes it over as the third attempt.
    with anyio.fail_after(5):
        while not (claimed := await broker.reclaim(sub, "w:2:1", 0.2, 10)):
            await anyio.sleep(0.05)
    assert [d.attempt for d in claimed] == [3]
    await broker.ack(sub, claimed)
    await app.close()


async def test_a_live_worker_keeps_the_lease_of_a_long_handler(
    make_app: Callable[[], App], topic: str
) -> None:
    first, second = make_app(), make_app()
    runs: list[int] = []

    for app in (first, second):

        @app.agent(topic, reclaim_idle=0.3, name="slow")
        async def slow(event: Order, ctx: Context) -> None:
            runs.append(ctx.attempt)
            await anyio.sleep(1.5)

    async with first.running(), second.running():
        await first.publish(topic, {"order_id": "o1"})
        await wait_for(lambda: runs == [1])
        await anyio.sleep(1.8)  # five reclaim periods: the other worker must not take it
    assert runs == [1]


async def test_workers_of_one_agent_share_and_agents_fan_out(
    make_app: Callable[[], App], topic: str
) -> None:
    apps = [make_app(), make_app()]
    seen: list[tuple[str, int, str]] = []

    for n, app in enumerate(apps):

        @app.agent(topic, name="a", concurrency=2)
        async def a(event: Order, worker: int = n) -> None:
            seen.append(("a", worker, event.order_id))
            await anyio.sleep(0.01)

        @app.agent(topic, name="b")
        async def b(event: Order, worker: int = n) -> None:
            seen.append(("b", worker, event.order_id))

    async with apps[0].running(), apps[1].running():
        await apps[0].publish_many([(topic, {"order_id": f"o{i}"}) for i in range(40)])
        await wait_for(lambda: len(seen) == 80)
        await anyio.sleep(0.2)
    expected = sorted(f"o{i}" for i in range(40))
    assert sorted(e for agent, _, e in seen if agent == "a") == expected
    assert sorted(e for agent, _, e in seen if agent == "b") == expected
    assert {n for agent, n, _ in seen if agent == "a"} == {0, 1}


async def test_graceful_stop_finishes_in_flight_work_and_acknowledges_it(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    started: list[str] = []
    finished: list[str] = []

    @app.agent(topic, concurrency=2, reclaim_idle=0.3)
    async def work(event: Order) -> None:
        started.append(event.order_id)
        await anyio.sleep(0.4)
        finished.append(event.order_id)

    worker = Worker(app, shutdown_grace=5)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await app.publish_many([(topic, {"order_id": f"o{i}"}) for i in range(4)])
        await wait_for(lambda: len(started) == 2)
        worker.stop()
    assert sorted(finished) == sorted(started)
    assert len(started) == 2

    # The next worker gets exactly the two that were never started: nothing was lost,
    # nothing acknowledged too early, nothing delivered twice.
    async with app.running():
        await wait_for(lambda: len(finished) == 4)
        await anyio.sleep(0.5)
    assert sorted(started) == [f"o{i}" for i in range(4)]


async def test_start_latest_skips_history(make_app: Callable[[], App], topic: str) -> None:
    app = make_app()
    early: list[str] = []
    late: list[str] = []

    @app.agent(topic, name="early")
    async def early_agent(event: Order) -> None:
        early.append(event.order_id)

    @app.agent(topic, name="late", start="latest")
    async def late_agent(event: Order) -> None:
        late.append(event.order_id)

    await app.publish(topic, {"order_id": "before"})
    async with app.running():
        await app.publish(topic, {"order_id": "after"})
        await wait_for(lambda: len(early) == 2 and len(late) == 1)
    assert early == ["before", "after"]
    assert late == ["after"]


async def test_retry_delay_is_honoured(make_app: Callable[[], App], topic: str) -> None:
    app = make_app()
    times: list[float] = []

    @app.agent(topic, max_retries=1)
    async def later(event: Order) -> None:
        times.append(anyio.current_time())
        if len(times) == 1:
            raise Retry(delay=0.5)

    async with app.running():
        await app.publish(topic, {"order_id": "o1"})
        await wait_for(lambda: len(times) == 2)
    assert times[1] - times[0] >= 0.45


async def test_concurrency_bounds_handlers_and_what_is_fetched(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    running = 0
    peak = 0
    release = anyio.Event()

    @app.agent(topic, concurrency=2)
    async def work(event: Order) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    async with app.running():
        await app.publish_many([(topic, {"order_id": f"o{i}"}) for i in range(6)])
        await wait_for(lambda: running == 2)
        await anyio.sleep(0.3)  # time enough to over-fetch, were it going to
        info = await app.broker.describe(topic)  # only two entries were handed to the worker
        assert info is not None
        assert [(g.group, g.pending) for g in info.groups] == [("work", 2)]
        release.set()
        await wait_for(lambda: running == 0)
    assert peak == 2


async def test_delayed_events_are_seen_at_their_time_and_not_before(
    make_app: Callable[[], App], topic: str
) -> None:
    from datetime import UTC, datetime, timedelta

    app = make_app()
    seen: list[tuple[str, float]] = []

    @app.agent(topic)
    async def work(event: Order) -> None:
        seen.append((event.order_id, anyio.current_time()))

    async with app.running():
        later_at = anyio.current_time()
        await app.publish(topic, {"order_id": "later"}, delay=0.6)
        sooner_at = anyio.current_time()
        await app.publish(topic, {"order_id": "sooner"}, delay=timedelta(seconds=0.3))
        await app.publish(topic, {"order_id": "past"}, at=datetime.now(UTC) - timedelta(hours=1))
        await app.publish(topic, {"order_id": "now"})
        await wait_for(lambda: len(seen) == 4)
    order = [name for name, _ in seen]
    assert set(order[:2]) == {"past", "now"}
    times = dict(seen)
    assert times["sooner"] - sooner_at >= 0.25
    assert times["later"] - later_at >= 0.55
    if (
        sooner_at + 0.3 < later_at + 0.6 - 0.1
    ):  # unless the first publish took 0.2 s (a loaded machine)
        assert order[2:] == ["sooner", "later"]
    with pytest.raises(ValueError, match="not both"):
        await app.publish(topic, {"order_id": "x"}, delay=1, at=datetime.now(UTC))


async def test_stored_results_show_status_while_running_and_the_outcome_after(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    release = anyio.Event()
    running = anyio.Event()

    @app.agent(topic, store_results=True, max_retries=1, retry_backoff=0.05)
    async def work(event: Order, ctx: Context) -> dict[str, str]:
        if event.order_id == "slow":
            running.set()
            await release.wait()
        if event.order_id == "bad":
            raise ValueError("bad order")
        return {"done": event.order_id}

    async with app.running():
        slow = await app.publish(topic, {"order_id": "slow"})
        bad = await app.publish(topic, {"order_id": "bad"})
        assert (await app.result("0190-unknown")).status == "pending"
        with anyio.fail_after(5):
            await running.wait()
        current = await app.result(slow)
        assert (current.status, current.attempts, current.agent) == ("running", 1, "work")
        assert current.started_at is not None and current.finished_at is None
        with pytest.raises(TimeoutError, match="did not finish"):
            await app.result(slow, timeout=0.1)
        release.set()
        done = await app.result(slow, timeout=5)
        failed = await app.result(bad, timeout=5)
    assert (done.status, done.result, done.error) == ("succeeded", {"done": "slow"}, None)
    assert done.finished and done.finished_at is not None
    assert (failed.status, failed.attempts) == ("dead_lettered", 2)
    assert failed.error == {"type": "ValueError", "message": "bad order"}


async def test_results_name_their_agent_and_expire(make_app: Callable[[], App], topic: str) -> None:
    app = make_app()

    @app.agent(topic, store_results=True, result_ttl=0.5, name="first")
    async def first(event: Order) -> str:
        return "one"

    @app.agent(topic, store_results=True, result_ttl=0.5, name="second")
    async def second(event: Order) -> str:
        return "two"

    async with app.running():
        event_id = await app.publish(topic, {"order_id": "o1"})
        assert (await app.result(event_id, agent="first", timeout=5)).result == "one"
        assert (await app.result(event_id, agent="second", timeout=5)).result == "two"
        with pytest.raises(ValueError, match="pass agent="):
            await app.result(event_id)
        with anyio.fail_after(5):  # kept result_ttl after the last write, then gone
            while (await app.result(event_id, agent="first")).status != "pending":
                await anyio.sleep(0.1)


class Quote(BaseModel):
    sku: str
    price: int


async def test_request_returns_the_handlers_reply_and_cleans_up(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()

    @app.agent(topic)
    async def price(event: Order, ctx: Context) -> dict[str, Any]:
        return {"sku": event.order_id, "price": 42}

    async with app.running():
        reply = await app.request(topic, {"order_id": "A1"}, timeout=10)
        typed = await app.request(topic, {"order_id": "B2"}, timeout=10, response_type=Quote)
    assert reply == {"sku": "A1", "price": 42}
    assert typed == Quote(sku="B2", price=42)
    broker = app.broker
    if isinstance(broker, RedisBroker):
        await broker.connect()
        assert [k async for k in broker.client.scan_iter(match="omni:{omni-reply.*")] == []
        await broker.close()
    elif isinstance(broker, MemoryBroker):
        assert not [t for t in broker._bus.topics if t.startswith("omni-reply.")]
    else:
        async with broker.clone() as bus:
            assert not [t for t in await bus.topics() if t.startswith("omni-reply.")]


async def test_replies_of_several_agents_leave_no_reply_topic_behind(
    make_app: Callable[[], App], topic: str
) -> None:
    # Two agents answer every request. `late` is held until all 20 requests have returned,
    # so each of its replies reaches a reply topic that was already deleted: it must be
    # dropped, not recreate the topic with nobody left to delete it.
    app = make_app()
    reply_topics: list[str] = []
    release = anyio.Event()

    @app.agent(topic)
    async def quick(event: Order, ctx: Context) -> str:
        assert ctx.event.reply_to is not None
        reply_topics.append(ctx.event.reply_to)
        return "quick"

    @app.agent(topic, concurrency=20)
    async def late(event: Order, ctx: Context) -> str:
        await release.wait()
        # Every way a reply goes out: the return value, ctx.reply, and a failure reply.
        n = int(event.order_id)
        if n % 3 == 1:
            await ctx.reply("late, early")
        elif n % 3 == 2:
            raise Reject("late, and no")
        return "late"

    async def late_is_done() -> bool:
        info = await app.broker.describe(topic)
        group = next((g for g in info.groups if g.group == "late"), None) if info else None
        # Settled only after its outputs went out: no pending and nothing left to read means
        # every late reply was handled by the bus.
        return group is not None and group.lag == 0 and group.pending == 0

    async with app.running():
        for n in range(20):
            assert await app.request(topic, {"order_id": str(n)}, timeout=10) == "quick"
        release.set()
        with anyio.fail_after(10):
            while not await late_is_done():
                await anyio.sleep(0.02)
        broker = app.broker
        assert len(set(reply_topics)) == 20
        assert [t for t in reply_topics if await broker.describe(t) is not None] == []
        if isinstance(broker, RedisBroker):
            left = [
                key
                async for key in broker.client.scan_iter(match="omni:{omni-reply.*", count=1000)
                if any(f"{{{t}}}" in key.decode() for t in reply_topics)
            ]
            assert left == []


async def test_a_request_the_agent_gives_up_on_raises_agent_failed_at_once(
    make_app: Callable[[], App], topic: str
) -> None:
    from omnidaemon import AgentFailed

    app = make_app()

    @app.agent(topic, max_retries=1, retry_backoff=0.05)
    async def price(event: Order) -> int:
        if event.order_id == "reject":
            raise Reject("unknown sku")
        raise LookupError("price list unavailable")

    async with app.running():
        start = anyio.current_time()
        with pytest.raises(AgentFailed) as failed:
            await app.request(topic, {"order_id": "x"}, timeout=20)
        assert anyio.current_time() - start < 10  # not the timeout
        with pytest.raises(AgentFailed) as rejected:
            await app.request(topic, {"order_id": "reject"}, timeout=20)
    assert (failed.value.error_type, failed.value.message) == (
        "LookupError",
        "price list unavailable",
    )
    assert failed.value.agent == "price"
    assert (rejected.value.error_type, rejected.value.message) == ("Reject", "unknown sku")


async def test_a_request_nobody_answers_times_out(make_app: Callable[[], App], topic: str) -> None:
    app = make_app()
    with pytest.raises(TimeoutError, match="no reply"):
        await app.request(topic, {"order_id": "x"}, timeout=0.3)
    await app.close()


async def test_ctx_reply_answers_early_and_only_once(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()

    @app.agent(topic)
    async def early(event: Order, ctx: Context) -> str:
        await ctx.reply({"ack": event.order_id})
        return "not sent again"

    async with app.running():
        assert await app.request(topic, {"order_id": "o1"}, timeout=10) == {"ack": "o1"}


class Payment(BaseModel):
    payment_id: str
    amount: int


async def test_idempotency_key_runs_the_handler_once_per_key(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    charged: list[tuple[str, int]] = []
    release = anyio.Event()

    @app.agent(topic, publishes=f"{topic}.charged", idempotency_key=lambda e: e.payment_id)
    async def charge(event: Payment, ctx: Context) -> dict[str, Any]:
        charged.append((event.payment_id, ctx.attempt))
        if event.payment_id == "slow":
            await release.wait()
        return {"receipt": f"r-{event.payment_id}-{len(charged)}"}

    outputs: list[dict[str, Any]] = []

    @app.agent(f"{topic}.charged")
    async def collect(event: dict[str, Any]) -> None:
        outputs.append(event)

    async with app.running():
        # Duplicates published one after the other: the second gets the stored result.
        await app.publish(topic, {"payment_id": "p1", "amount": 5})
        await wait_for(lambda: len(outputs) == 1)
        await app.publish(topic, {"payment_id": "p1", "amount": 5})
        await wait_for(lambda: len(outputs) == 2)
        # Duplicates in flight at the same time: one runs, the other waits for its result.
        await app.publish_many([(topic, {"payment_id": "slow", "amount": 1})] * 2)
        await wait_for(lambda: len(charged) == 2)
        await anyio.sleep(0.3)  # the duplicate must be waiting, not running
        assert [c for c in charged if c[0] == "slow"] == [("slow", 1)]
        release.set()
        await wait_for(lambda: len(outputs) == 4)
    assert [p for p, _ in charged] == ["p1", "slow"]
    assert outputs[0] == outputs[1] == {"receipt": "r-p1-1"}
    assert outputs[2] == outputs[3] == {"receipt": "r-slow-2"}


async def test_a_failed_run_releases_its_key_and_a_crashed_one_is_taken_over(
    make_app: Callable[[], App], topic: str
) -> None:
    from omnidaemon.envelope import dumps as encode

    app = make_app()
    runs: list[tuple[str, int]] = []

    @app.agent(
        topic,
        idempotency_key=lambda e: e.payment_id,
        retry_backoff=0.01,
        store_results=True,
    )
    async def charge(event: Payment, ctx: Context) -> str:
        runs.append((event.payment_id, ctx.attempt))
        if event.payment_id == "flaky" and ctx.attempt == 1:
            raise ConnectionError("gateway down")
        return "ok"

    await app.connect()
    # A worker died while running "crashed": its claim names the same event, which is taken
    # over at once instead of waiting for the claim's lease to run out.
    crashed = await app.publish(topic, {"payment_id": "crashed", "amount": 1})
    await app.broker.set_value(
        "idempotency:charge:crashed",
        encode({"state": "running", "event_id": crashed}),
        600,
    )
    async with app.running():
        flaky = await app.publish(topic, {"payment_id": "flaky", "amount": 1})
        assert (await app.result(flaky, timeout=10)).status == "succeeded"
        assert (await app.result(crashed, timeout=10)).status == "succeeded"
    assert sorted(runs) == [("crashed", 1), ("flaky", 1), ("flaky", 2)]
    await app.close()


async def test_a_request_that_kills_its_workers_ends_in_agent_failed(
    make_app: Callable[[], App], topic: str
) -> None:
    from omnidaemon import AgentFailed

    app = make_app()

    @app.agent(topic, max_retries=0, reclaim_idle=0.2)
    async def price(event: Order) -> int:
        return 1

    sub = Subscription(topic, "price")
    await app.connect()
    await app.broker.subscribe(sub)
    failures: list[AgentFailed] = []

    async def ask() -> None:
        try:
            await app.request(topic, {"order_id": "boom"}, timeout=20)
        except AgentFailed as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        with anyio.fail_after(5):  # a worker takes the request and dies holding it
            while not await app.broker.fetch(sub, "dead:1:1", 1, 0.2):
                pass
        async with app.running():
            await wait_for(lambda: bool(failures))
    assert failures[0].error_type == "AttemptsExhausted"
    await app.close()


async def test_dead_letters_are_replayed_to_their_agent_alone(
    make_app: Callable[[], App], topic: str
) -> None:
    app = make_app()
    fixed = False
    runs: list[tuple[str, str, int]] = []

    @app.agent(topic, max_retries=0)
    async def fragile(event: Order, ctx: Context) -> None:
        runs.append(("fragile", event.order_id, ctx.attempt))
        if not fixed:
            raise RuntimeError("bug")

    @app.agent(topic)
    async def other(event: Order, ctx: Context) -> None:
        runs.append(("other", event.order_id, ctx.attempt))

    async with app.running():
        first = await app.publish(topic, {"order_id": "o1"})
        await app.publish(topic, {"order_id": "o2"})
        await wait_dead_letters(app, "fragile", 2)
        fixed = True  # the bug is fixed: replay one, then the rest
        assert await app.replay_dead_letters("fragile", event_ids=[first]) == 1
        await wait_for(lambda: runs.count(("fragile", "o1", 1)) == 2)
        assert [d.payload for d in await app.dead_letters("fragile")] == [{"order_id": "o2"}]
        assert await app.replay_dead_letters("fragile") == 1
        await wait_for(lambda: runs.count(("fragile", "o2", 1)) == 2)
        assert await app.dead_letters("fragile") == []
        await anyio.sleep(0.2)
    assert sorted(r for r in runs if r[0] == "other") == [("other", "o1", 1), ("other", "o2", 1)]
