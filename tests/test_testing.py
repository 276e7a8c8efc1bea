"""The user-facing test harness, `omnidaemon.testing.TestApp`."""

from __future__ import annotations

import threading

import anyio
import pytest

from omnidaemon import App, Context
from omnidaemon.brokers import MemoryBroker

pytestmark = pytest.mark.anyio


async def test_test_app_swaps_the_broker_and_restores_it() -> None:
    original = MemoryBroker(None)
    app = App("t", broker=original)

    @app.agent("a.b")
    async def handle(event: dict[str, int]) -> None:
        pass

    from omnidaemon.testing import TestApp

    async with TestApp(app) as bus:
        assert app.broker is bus.broker
        await bus.publish("a.b", {"n": 1})
        await bus.drain()
        assert [e.payload for e in bus.published("a.b")] == [{"n": 1}]
    assert app.broker is original


async def test_drain_skips_backoff_but_keeps_attempt_counts() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))
    attempts: list[int] = []

    @app.agent("a.b", max_retries=5, retry_backoff=600)  # ten minutes between attempts
    async def flaky(event: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("down")

    with anyio.fail_after(5):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 1})
            await bus.drain()
    assert attempts == [1, 2, 3, 4, 5, 6]


async def test_drain_times_out_on_a_handler_that_never_returns() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))

    @app.agent("a.b")
    async def stuck(event: dict[str, int]) -> None:
        await anyio.sleep(3600)

    with pytest.warns(RuntimeWarning, match="'stuck' was still running"):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 1})
            with pytest.raises(TimeoutError, match="still busy"):
                await bus.drain(timeout=0.2)


async def test_published_lists_everything_in_order_and_by_topic() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))

    @app.agent("a.b", publishes="a.c")
    async def relay(event: dict[str, int]) -> dict[str, int]:
        return {"n": event["n"] * 10}

    async with TestApp(app) as bus:
        await bus.publish("a.b", {"n": 1})
        await bus.drain()
        assert [(e.topic, e.payload) for e in bus.published()] == [
            ("a.b", {"n": 1}),
            ("a.c", {"n": 10}),
        ]
        assert bus.dead_letters("relay") == []


async def test_drain_skips_publish_delays() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))
    seen: list[int] = []

    @app.agent("a.b")
    async def work(event: dict[str, int]) -> None:
        seen.append(event["n"])

    with anyio.fail_after(5):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 2}, delay=3600)
            await bus.publish("a.b", {"n": 1}, delay=60)
            await bus.drain()
    assert seen == [1, 2]


async def test_an_error_raised_in_the_block_propagates_as_itself() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))

    @app.agent("a.b")
    async def work(event: dict[str, int]) -> None:
        pass

    with pytest.raises(TimeoutError, match="the model never answered"):
        async with TestApp(app):
            raise TimeoutError("the model never answered")
    with pytest.raises(KeyError):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 1})
            raise KeyError("missing")

    # Two failures at once (the test's and a shutdown hook's) are both reported.
    @app.on_shutdown
    async def broken_hook() -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(ExceptionGroup) as caught:
        async with TestApp(app):
            raise ValueError("test failed")
    assert sorted(type(e).__name__ for e in _leaves(caught.value)) == [
        "RuntimeError",
        "ValueError",
    ]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


async def test_leaving_the_block_with_a_hung_handler_is_prompt_and_warns() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))
    started = anyio.Event()

    @app.agent("a.b")
    async def stuck(event: dict[str, int]) -> None:
        started.set()
        await anyio.sleep(3600)

    with (
        anyio.fail_after(2),  # the old default waited 5 s for it
        pytest.warns(RuntimeWarning, match=r"'stuck' was still running .* cancelled"),
    ):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 1})
            await started.wait()


async def test_publish_sync_from_a_thread_or_the_test_reaches_the_test_bus() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))
    handled: list[int] = []

    @app.agent("order.placed")
    async def confirm(event: dict[str, int]) -> None:
        handled.append(event["n"])

    @app.agent("order.misused")
    async def misuse(event: dict[str, int]) -> None:
        app.publish_sync("order.placed", {"n": 0})  # blocks the loop in production: refused

    def view(n: int) -> str:  # a Django or Flask view: plain sync code
        return app.publish_sync("order.placed", {"n": n})

    async with TestApp(app) as bus:
        in_thread = await anyio.to_thread.run_sync(view, 1)
        direct = view(2)  # called from the test itself, on the harness's event loop
        await bus.publish("order.misused", {"n": 3})
        await bus.drain()
        assert [e.id for e in bus.published("order.placed")] == [in_thread, direct]
        [letter] = bus.dead_letters("misuse")
        assert "in async code, use `await app.publish" in letter.error_message
    assert handled == [1, 2]


async def test_advance_times_out_hung_handlers_on_the_test_clock() -> None:
    from omnidaemon.testing import TestApp

    app = App("t", broker=MemoryBroker(None))
    attempts: list[int] = []

    @app.agent("a.b", timeout=30, max_retries=2, retry_backoff=60)
    async def hangs(event: dict[str, int], ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await anyio.Event().wait()  # a model call that never answers

    never_set = threading.Event()

    @app.agent("a.c", timeout=30, max_retries=0)
    def hangs_in_a_thread(event: dict[str, int]) -> None:
        never_set.wait()  # a sync handler: its thread runs on, its attempt fails

    with anyio.fail_after(5):  # thirty seconds, three times, in real time would be 90 s
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"n": 1})
            await bus.publish("a.c", {"n": 1})
            await bus.advance(29)
            assert attempts == [1]
            assert bus.dead_letters("hangs") == []
            await bus.advance(1)  # attempt 1 reaches its timeout; attempt 2 starts
            assert attempts == [1, 2]
            await bus.advance(30)
            await bus.advance(30)
            [letter] = bus.dead_letters("hangs")
            assert (letter.error_type, letter.attempts) == ("TimeoutError", 3)
            [letter] = bus.dead_letters("hangs_in_a_thread")
            assert letter.error_type == "TimeoutError"
    never_set.set()  # let the thread end
