"""Cancellation in one process (`TestApp` and `App.running` on a memory bus): every state an
event can be in when it is cancelled, and what the user sees of the outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest

from omnidaemon import App, Cancelled, Context, Retry
from omnidaemon.brokers import MemoryBroker
from omnidaemon.testing import TestApp
from tests.http_receiver import Receiver, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving() as rec:
        yield rec


async def _metrics(app: App, agent: str) -> dict[str, int]:
    from omnidaemon.fleet import fleet_metrics

    with anyio.fail_after(5):
        while True:
            found = [s for s in await fleet_metrics(app.broker, agent=agent)]
            if found and found[0].cancelled:
                return found[0].to_json()
            await anyio.sleep(0.02)


async def test_a_delayed_event_cancelled_before_it_is_due_never_starts() -> None:
    app = App("c", broker="memory://")
    ran: list[int] = []

    @app.agent("work.later", store_results=True)
    async def later(event: dict[str, int]) -> None:
        ran.append(event["n"])

    async with TestApp(app) as bus:
        kept = await bus.publish("work.later", {"n": 1}, delay=60)
        dropped = await bus.publish("work.later", {"n": 2}, delay=60)
        stored = await app.cancel(dropped, reason="not needed any more")
        await bus.drain()
        assert ran == [1]
        assert (await app.result(kept)).status == "succeeded"
        result = await app.result(dropped)
        assert result.status == "cancelled" and result.finished
        assert result.error == {"type": "Cancelled", "message": "not needed any more"}
        assert stored.kind == "event" and stored.target == dropped and stored.agents is None
        counts = await _metrics(app, "later")
        assert counts["cancelled"] == 1 and counts["succeeded"] == 1
        assert bus.dead_letters("later") == []


async def test_a_running_async_handler_is_stopped_and_its_output_not_published() -> None:
    app = App("c", broker="memory://")
    started, stopped = anyio.Event(), anyio.Event()

    @app.agent("work.slow", publishes="work.done", store_results=True, max_retries=3)
    async def slow(event: dict[str, int], ctx: Context) -> dict[str, int]:
        started.set()
        try:
            await anyio.sleep(60)
        finally:
            stopped.set()
        return event

    async with TestApp(app) as bus:
        event_id = await bus.publish("work.slow", {"n": 1})
        await started.wait()
        await app.cancel(event_id, reason="user closed the tab")
        with anyio.fail_after(2):
            await stopped.wait()
        await bus.drain()
        result = await app.result(event_id)
        assert result.status == "cancelled" and result.attempts == 1
        assert result.error == {"type": "Cancelled", "message": "user closed the tab"}
        assert bus.published("work.done") == []  # not published, and not retried
        assert bus.dead_letters("slow") == []


async def test_a_sync_handler_is_told_through_ctx_cancelled_and_its_return_is_dropped() -> None:
    app = App("c", broker="memory://")
    started = threading.Event()
    saw: list[tuple[bool, str | None]] = []

    @app.agent("work.sync", publishes="work.done", store_results=True)
    def crunch(event: dict[str, int], ctx: Context) -> dict[str, int]:
        started.set()
        deadline = time.monotonic() + 10
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)  # one step of the work, then look again
        saw.append((ctx.cancelled, ctx.cancel_reason))
        return event

    async with TestApp(app) as bus:
        event_id = await bus.publish("work.sync", {"n": 1})
        await anyio.to_thread.run_sync(started.wait)
        await app.cancel(event_id, reason="stop")
        await bus.drain()
        assert saw == [(True, "stop")]
        assert (await app.result(event_id)).status == "cancelled"
        assert bus.published("work.done") == []


async def test_a_retrying_event_is_not_tried_again() -> None:
    app = App("c", broker="memory://")
    attempts: list[int] = []

    @app.agent("work.flaky", store_results=True, max_retries=5)
    async def flaky(event: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Retry(delay=30)

    async with TestApp(app, fast_retries=False) as bus:
        event_id = await bus.publish("work.flaky", {"n": 1})
        with anyio.fail_after(5):
            while (await app.result(event_id)).status != "retrying":
                await anyio.sleep(0.01)
        await app.cancel(event_id)
        await bus.advance(31)
        assert attempts == [1]
        assert (await app.result(event_id)).status == "cancelled"


async def test_a_request_whose_event_is_cancelled_raises_cancelled() -> None:
    app = App("c", broker="memory://")
    started = anyio.Event()

    @app.agent("work.ask")
    async def ask(event: dict[str, int]) -> dict[str, int]:
        started.set()
        await anyio.sleep(60)
        return event

    published: list[str] = []

    async with TestApp(app) as bus:

        async def cancel_when_running() -> None:
            await started.wait()
            published.extend(e.id for e in bus.published("work.ask"))
            await app.cancel(published[0], reason="too slow")

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_running)
            with pytest.raises(Cancelled) as caught, anyio.fail_after(5):
                await app.request("work.ask", {"n": 1}, timeout=30)
        assert caught.value.message == "too slow" and caught.value.agent == "ask"
        assert caught.value.event_id == published[0]


async def test_cancelling_for_one_agent_leaves_the_others_alone() -> None:
    app = App("c", broker="memory://")
    handled: list[str] = []

    @app.agent("work.both", store_results=True)
    async def first(event: dict[str, int]) -> None:
        handled.append("first")

    @app.agent("work.both", store_results=True)
    async def second(event: dict[str, int]) -> None:
        handled.append("second")

    async with TestApp(app) as bus:
        event_id = await bus.publish("work.both", {"n": 1}, delay=10)
        await app.cancel(event_id, agent="first")
        await bus.drain()
        assert handled == ["second"]
        statuses = {
            r.agent: r.status
            for r in [await app.result(event_id, agent=a) for a in ("first", "second")]
        }
        assert statuses == {"first": "cancelled", "second": "succeeded"}


async def test_cancelling_a_run_stops_it_where_it_is_and_what_it_would_publish() -> None:
    app = App("c", broker="memory://")
    started = anyio.Event()
    steps: list[str] = []

    @app.agent("run.start", publishes="run.middle")
    async def start(event: dict[str, int]) -> dict[str, int]:
        steps.append("start")
        return event

    @app.agent("run.middle", publishes="run.end", store_results=True)
    async def middle(event: dict[str, int], ctx: Context) -> dict[str, int]:
        steps.append("middle")
        # Fan-out published before the cancel: delayed, so it comes due after it.
        await ctx.publish("run.side", event, delay=5)
        started.set()
        await anyio.sleep(60)
        return event

    @app.agent("run.end")
    async def end(event: dict[str, int]) -> None:
        steps.append("end")

    @app.agent("run.side", store_results=True)
    async def side(event: dict[str, int]) -> None:
        steps.append("side")

    @app.agent("other.run")
    async def other(event: dict[str, int]) -> None:
        steps.append("other")

    async with TestApp(app) as bus:
        await bus.publish("run.start", {"n": 1}, correlation_id="run-1")
        await bus.publish("other.run", {"n": 2}, correlation_id="run-2")
        await started.wait()
        stored = await app.cancel(correlation_id="run-1", reason="abandoned")
        await bus.drain()
        assert sorted(steps) == ["middle", "other", "start"]
        assert stored.kind == "run" and stored.target == "run-1"
        middle_id = bus.published("run.middle")[0].id
        side_id = bus.published("run.side")[0].id
        assert (await app.result(middle_id)).status == "cancelled"
        assert (await app.result(side_id)).status == "cancelled"
        assert bus.published("run.end") == []


async def test_a_cancelled_handler_can_publish_nothing_more() -> None:
    app = App("c", broker="memory://")
    outcome: list[str] = []

    @app.agent("work.chatty")
    def chatty(event: dict[str, int], ctx: Context) -> None:
        while not ctx.cancelled:
            time.sleep(0.01)
        try:
            ctx.publish_sync("work.more", event)
        except Cancelled as exc:
            outcome.append(exc.message)

    @app.agent("work.more")
    async def more(event: dict[str, int]) -> None:
        outcome.append("more ran")

    async with TestApp(app) as bus:
        event_id = await bus.publish("work.chatty", {"n": 1})
        with anyio.fail_after(5):
            while not app.broker.pending(_sub("work.chatty", "chatty")):  # type: ignore[attr-defined]
                await anyio.sleep(0.01)
        await app.cancel(event_id, reason="enough")
        await bus.drain()
        assert outcome == ["enough"]


def _sub(topic: str, group: str) -> Any:
    from omnidaemon.brokers.base import Subscription

    return Subscription(topic, group)


async def test_an_event_held_back_by_flow_control_is_cancelled_when_it_comes_back() -> None:
    app = App("c", broker="memory://")
    ran: list[int] = []

    @app.agent("work.paced", rate_limit="1/m", store_results=True)
    async def paced(event: dict[str, int]) -> None:
        ran.append(event["n"])

    async with TestApp(app, fast_retries=False) as bus:
        await bus.publish("work.paced", {"n": 1})
        waiting = await bus.publish("work.paced", {"n": 2})
        await bus.advance(1)  # the first runs; the second waits for its turn
        await app.cancel(waiting)
        await bus.advance(61)
        await bus.drain()
        assert ran == [1]
        assert (await app.result(waiting)).status == "cancelled"


async def test_the_webhook_is_told_cancelled(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_SECRET", "whsec-test")
    monkeypatch.setenv("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", "1")  # the receiver is on loopback
    app = App("c", broker=MemoryBroker(None))

    @app.agent("work.hooked")
    async def hooked(event: dict[str, int]) -> None:
        pass

    async with app.running():
        event_id = await app.publish(
            "work.hooked", {"n": 1}, webhook=receiver.url("/hook"), delay=30
        )
        await app.cancel(event_id, reason="changed my mind")
        app.broker.advance(31)  # type: ignore[attr-defined]
        with anyio.fail_after(10):
            while not receiver.requests:
                await anyio.sleep(0.02)
    body = orjson.loads(receiver.requests[0].body)
    assert body["event_id"] == event_id and body["status"] == "cancelled"
    assert body["error"] == {"type": "Cancelled", "message": "changed my mind"}


async def test_cancel_refuses_what_it_cannot_mean() -> None:
    app = App("c", broker="memory://")
    async with app:
        with pytest.raises(ValueError, match="one of the two"):
            await app.cancel()
        with pytest.raises(ValueError, match="one of the two"):
            await app.cancel("e1", correlation_id="r1")
        with pytest.raises(ValueError, match="every agent"):
            await app.cancel(correlation_id="r1", agent="a")
        with pytest.raises(ValueError, match="not an id"):
            await app.cancel("  ")
        first = await app.cancel("e1", agent="a", reason="one")
        merged = await app.cancel("e1", agent="b", reason="two")
        assert first.agents == ("a",) and merged.agents == ("a", "b")
        assert merged.reason == "two"
        assert (await app.cancel("e1")).agents is None


async def test_the_handler_slot_serves_the_next_events_after_a_cancel() -> None:
    # One handler task (concurrency=1): the cancelled handler's task goes on serving, and
    # the next handlers' own timeouts and awaits behave as if nothing happened.
    app = App("c", broker="memory://")
    started = anyio.Event()
    done: list[int] = []

    @app.agent("work.one", concurrency=1, store_results=True)
    async def one(event: dict[str, int], ctx: Context) -> int:
        if event["n"] == 0:
            started.set()
            try:
                await anyio.sleep(60)
            except BaseException:
                # Swallowed: the outcome is cancelled all the same.
                return -1
        with anyio.move_on_after(0.01):
            await anyio.sleep(1)
        await anyio.lowlevel.checkpoint()
        done.append(event["n"])
        return event["n"]

    async with TestApp(app) as bus:
        first = await bus.publish("work.one", {"n": 0})
        await started.wait()
        await app.cancel(first, reason="swallowed")
        later = [await bus.publish("work.one", {"n": n}) for n in (1, 2, 3)]
        await bus.drain()
        assert done == [1, 2, 3]
        assert (await app.result(first)).status == "cancelled"
        assert [(await app.result(e)).status for e in later] == ["succeeded"] * 3


async def test_cancelling_a_run_never_strands_a_debounce_window_of_other_runs() -> None:
    # Run A's message opens the window, run B's joins it: the window's timer must outlive the
    # cancel of run A, and B's message reach the handler.
    from datetime import timedelta

    app = App("c", broker="memory://")
    calls: list[list[str]] = []

    @app.agent(
        "chat.message", debounce=timedelta(seconds=5), debounce_key=lambda m: m["conversation"]
    )
    async def answer(messages: list[dict[str, str]]) -> None:
        calls.append([m["text"] for m in messages])

    async with TestApp(app, fast_retries=False) as bus:
        await bus.publish("chat.message", {"conversation": "c", "text": "a"}, correlation_id="A")
        await bus.publish("chat.message", {"conversation": "c", "text": "b"}, correlation_id="B")
        await bus.advance(1)
        await app.cancel(correlation_id="A", reason="user stopped run A")
        await bus.advance(120)
    assert calls == [["a", "b"]]


async def test_a_message_cancelled_before_it_is_collected_is_left_out_of_its_burst() -> None:
    from datetime import timedelta

    app = App("c", broker="memory://")
    calls: list[list[str]] = []

    @app.agent("chat.line", debounce=timedelta(seconds=5))
    async def answer(messages: list[dict[str, str]]) -> None:
        calls.append([m["text"] for m in messages])

    async with TestApp(app, fast_retries=False) as bus:
        kept = await bus.publish("chat.line", {"text": "kept"})
        dropped = await bus.publish("chat.line", {"text": "dropped"}, delay=2)
        await app.cancel(dropped)
        await bus.advance(1)
        await bus.advance(2)
        await bus.advance(10)
    assert kept and calls == [["kept"]]
