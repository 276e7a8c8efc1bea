"""Schedules in-process, the edges: a tick owed after an outage (its holder died firing it, or
the first worker came back within the grace); a function's timeout; a schedule that falls
behind; a plain `def` that must not hold up a worker's stop; declarations refused or read
leniently."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import orjson
import pytest

from omnidaemon import App
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.errors import ConfigurationError
from omnidaemon.schedules import TICK_HEADER
from omnidaemon.testing import TestApp
from omnidaemon.worker import schedule_state as states
from omnidaemon.worker.runner import Worker
from omnidaemon.worker.schedule_state import ScheduleState, state_key
from omnidaemon.worker.scheduler import ScheduleRunner

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fired_at(bus: TestApp, topic: str) -> list[float]:
    """The ticks published on `topic`, in seconds after T0."""
    return [
        datetime.fromisoformat(e.headers[TICK_HEADER]).timestamp() - T0.timestamp()
        for e in bus.published(topic)
    ]


async def outcome(bus: TestApp, app: App, name: str) -> ScheduleState:
    data = await bus.broker.get_value(state_key(app.name, name))
    assert data is not None
    return ScheduleState.decode(data)


@pytest.mark.parametrize(
    ("published", "outage"),
    [(False, 40.0), (True, 86_400.0)],
    ids=["died-before-publishing", "died-after-publishing-one-day-outage"],
)
async def test_a_tick_whose_holder_died_is_owed_after_an_outage(
    published: bool, outage: float
) -> None:
    # The last worker claims the tick at :20 and dies (before or after its publish); its
    # last watch stamp was at :19, so the tick falls in the outage that follows. It is owed
    # all the same, and fires once when a worker comes back, whatever catch_up says.
    app = App(f"sched-owed-{published}")
    app.every(10, topic="tick.due", payload={"n": 1})  # catch_up=False
    async with TestApp(app, now=T0) as bus:
        await bus.advance(19)  # :10 fires; the last stamp is at :19
        spec = app.schedules["tick.due"]
        key = state_key(app.name, spec.name)
        tick = T0.timestamp() + 20
        answer, _ = await bus.broker.update_value(key, states.claim(tick, "worker-A", tick))
        assert answer == "mine"
        if published:  # its event went out, then the worker died before settling the tick
            assert await ScheduleRunner(app, "worker-A")._publish(spec, tick) == ("fired", None)
        await bus.advance(outage, offline=True)
        # :20 once: after a day, its publish key (kept 10,000 periods: 27 h) refuses a second
        # publish.
        # The ticks after it fell due in the outage: missed, but for the last, owed (the
        # first worker came back 9 s after it, within the grace of one period).
        last = 19 + outage - 9
        assert fired_at(bus, "tick.due") == [10.0, 20.0, last]
        state = await outcome(bus, app, spec.name)
        assert state.claim is None and state.last > tick


@pytest.mark.parametrize(("down", "fires"), [(15.0, True), (95.0, False)])
async def test_a_tick_due_in_a_short_outage_is_owed_within_the_grace(
    down: float, fires: bool
) -> None:
    # A single worker restarts across 09:00: back within a minute of the tick, the daily
    # report still fires (late); back more than a minute after it, the tick was missed.
    app = App(f"sched-grace-{down:g}")
    app.schedule("0 9 * * *", topic="report.due", payload={})  # catch_up=False
    async with TestApp(app, now=T0.replace(hour=8, minute=59, second=50)) as bus:
        await bus.advance(5)  # the worker's last stamp: 08:59:55
        await bus.advance(down, offline=True)  # back at 09:00:10, or at 09:01:30
        assert len(bus.published("report.due")) == (1 if fires else 0)
        state = await outcome(bus, app, "report.due")
        assert state.outcome == ("fired" if fires else "missed")
        await bus.advance(86_400)  # the next day's report, as usual
        assert len(bus.published("report.due")) == (2 if fires else 1)


async def test_the_grace_is_at_most_the_period() -> None:
    # An every-second schedule, down for 15 s: the ticks more than a second before the
    # restart were superseded by later ones (missed); the last one is owed and fires.
    app = App("sched-grace-period")
    app.every(1.0, topic="tick", payload={})
    async with TestApp(app, now=T0) as bus:
        await bus.advance(2.5)  # 1 and 2 fire; the last stamp is at 2.5
        await bus.advance(15.0, offline=True)  # back at 17.5
        assert fired_at(bus, "tick") == [1.0, 2.0, 17.0]
        await bus.advance(2.0)
        assert fired_at(bus, "tick")[-2:] == [18.0, 19.0]


async def test_a_slow_function_times_out_and_the_schedule_keeps_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without a timeout, a function slower than its interval makes every tick later than the
    # one before (and a hung one stalls the schedule, fleet-wide): the timeout fails the tick.
    app = App("sched-timeout", broker=MemoryBroker())
    lags: list[float] = []

    @app.every(0.2, topic="work.due", timeout=timedelta(seconds=0.1))
    async def slow(tick: datetime) -> None:
        lags.append(time.time() - tick.timestamp())
        await anyio.sleep(0.5)

    async with app.running():
        with anyio.fail_after(10):
            while len(lags) < 6:
                await anyio.sleep(0.05)
        data = await app.broker.get_value(state_key(app.name, "slow"))
    assert max(lags) < 0.4, lags  # bounded: the timeout plus the bus round trips
    assert data is not None
    state = ScheduleState.decode(data)
    assert state.outcome == "failed"
    assert state.error == "TimeoutError: the function ran past its timeout of 0.1 s"
    assert "schedule failed" in caplog.text
    assert app.schedules["slow"].timeout == 0.1


async def test_a_hung_plain_function_fails_its_tick_at_the_default_timeout() -> None:
    # Default timeout: the period, at least 1 s. The thread is abandoned, not waited for.
    app = App("sched-hung")
    release = threading.Event()

    @app.every(0.5, topic="hung.due")
    def hung() -> dict[str, Any]:
        release.wait(10)
        return {}

    assert app.schedules["hung"].timeout_at(0.0) == 1.0
    try:
        async with TestApp(app, now=T0) as bus:
            started = time.monotonic()
            await bus.advance(0.5)
            assert 0.9 < time.monotonic() - started < 3.0
            state = await outcome(bus, app, "hung")
            assert (state.outcome, state.error) == (
                "failed",
                "TimeoutError: the function ran past its timeout of 1 s",
            )
    finally:
        release.set()


async def test_a_schedule_behind_by_more_than_a_period_warns_once_per_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    app = App("sched-behind", broker=broker)
    app.every(1.0, topic="tick", payload={})
    runner = ScheduleRunner(app, "a")
    now = 3_000_000.0
    await runner.drive(now)
    await runner.drive(now + 3.5)  # 1, 2 and 3 fire late: 1 and 2 by more than a period
    assert len(await broker.entries("tick", 10)) == 3
    assert caplog.text.count("schedule behind") == 2


async def test_a_plain_function_does_not_hold_up_a_workers_stop() -> None:
    app = App("sched-stop", broker=MemoryBroker())
    entered = anyio.Event()
    release = threading.Event()

    @app.every(0.05, topic="slow.due", timeout=30)
    def slow() -> None:
        anyio.from_thread.run_sync(entered.set)
        release.wait(10)

    try:
        async with app.running(shutdown_grace=0.1):
            with anyio.fail_after(5):
                await entered.wait()
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 1.0
    finally:
        release.set()


async def test_a_statement_without_payload_is_refused_at_start() -> None:
    app = App("sched-no-payload", broker=MemoryBroker())
    app.every(60, topic="health.ping")  # forgot payload=: it would publish nothing

    @app.agent("health.ping")
    async def on_ping(event: dict[str, Any]) -> None:
        pass

    message = "every 60s on topic 'health.ping' was declared without payload= and never"
    with pytest.raises(ConfigurationError, match=message):
        Worker(app)
    with pytest.raises(ConfigurationError, match=message):
        Worker(app, schedules=False)  # a code bug whichever worker runs
    with pytest.raises(ConfigurationError, match=message):
        async with TestApp(app):
            pass
    with pytest.raises(ValueError, match="payload=None, which publishes nothing"):
        app.every(60, topic="health.null", payload=None)

    # Used as a decorator, the same call is fine.
    fine = App("sched-decorated", broker=MemoryBroker())
    declared = fine.every(60, topic="health.ping")

    def ping() -> dict[str, bool]:
        return {"ok": True}

    declared(ping)
    assert Worker(fine).schedules is not None


def test_intervals_and_timeouts_are_checked() -> None:
    app = App("sched-checks")
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        app.every(0.0015, topic="a", payload={})
    with pytest.raises(ValueError, match="whole number of milliseconds"):
        app.every(timedelta(microseconds=1_500_500), topic="a", payload={})
    app.every(0.2, topic="b", payload={})  # 200 ms, whatever the float's rounding
    app.every(timedelta(milliseconds=1500), topic="c", payload={})
    with pytest.raises(ValueError, match="more than 0 s"):
        app.every(1, topic="d", payload={}, timeout=0)
    with pytest.raises(TypeError, match="timedelta or seconds"):
        app.schedule("@daily", topic="d", payload={}, timeout="1m")  # type: ignore[arg-type]
    daily = app.schedule("@daily", topic="e", payload={}, name="daily")
    assert daily is not None
    assert app.schedules["daily"].timeout_at(0.0) == 60.0  # the period, at most 60 s


def test_a_state_with_fields_this_version_does_not_know_is_read() -> None:
    # A newer worker of a rolling upgrade may have written more fields.
    data = orjson.dumps(
        {
            "last": 10.0,
            "claim": {"tick": 20.0, "holder": "w", "until": 25.0, "attempt": 2},
            "fired": 10.0,
            "outcome": "fired",
            "outcome_tick": 10.0,
            "error": None,
            "lag": 0.5,
        }
    )
    state = ScheduleState.decode(data)
    assert state.last == 10.0 and state.claim == states.Claim(20.0, "w", 25.0)
    assert ScheduleState.decode(state.encode()) == state
