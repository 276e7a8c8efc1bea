"""Schedules in-process: TestApp's clock drives them, each tick once, in order; catch-up;
failures; the fleet's claim shared by two workers on one bus; declarations and inspection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from omnidaemon import App
from omnidaemon.asyncapi import asyncapi_document
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.envelope import Envelope
from omnidaemon.errors import PayloadValidationError
from omnidaemon.schedules import SCHEDULE_HEADER, TICK_HEADER, describe_schedule
from omnidaemon.testing import TestApp
from omnidaemon.worker import schedule_state as states
from omnidaemon.worker.schedule_state import LEASE, ScheduleState, state_key
from omnidaemon.worker.scheduler import ScheduleRunner

pytestmark = pytest.mark.anyio

LONDON = ZoneInfo("Europe/London")


def ticks(bus: TestApp, topic: str) -> list[datetime]:
    return [datetime.fromisoformat(e.headers[TICK_HEADER]) for e in bus.published(topic)]


async def test_advance_fires_each_due_tick_once_in_order() -> None:
    app = App("sched-basic")
    seen: list[datetime] = []

    @app.every(timedelta(seconds=10), topic="report.due")
    async def report(tick: datetime) -> dict[str, Any]:
        seen.append(tick)
        return {"at": tick.isoformat()}

    @app.agent("report.due")
    async def handle(event: dict[str, Any]) -> None:
        pass

    async with TestApp(app) as bus:
        await bus.drain()
        assert bus.published("report.due") == []  # a new schedule does not fire for the past
        await bus.advance(60)
        fired = ticks(bus, "report.due")
        assert len(fired) == 6
        assert [b - a for a, b in pairwise(fired)] == [timedelta(seconds=10)] * 5
        assert all(t.timestamp() % 10 == 0 for t in fired)  # multiples of the interval
        assert seen == fired
        first = bus.published("report.due")[0]
        assert first.headers[SCHEDULE_HEADER] == "report"
        assert first.payload == {"at": fired[0].isoformat()}
        assert first.correlation_id == f"schedule:report:{fired[0].isoformat()}"
        await bus.advance(5)
        await bus.advance(5)
        assert len(ticks(bus, "report.due")) == 7  # one more, still once


async def test_statement_with_payload_and_sync_function() -> None:
    app = App("sched-static")
    app.every(1.0, topic="ping", payload={"n": 1})

    @app.every(2.0, topic="sync.tick")
    def plain() -> dict[str, str]:
        """Runs in a thread, as a plain handler does."""
        return {"from": "thread"}

    async with TestApp(app) as bus:  # an app with schedules and no agents runs too
        await bus.advance(4)
        assert [e.payload for e in bus.published("ping")] == [{"n": 1}] * 4
        assert [e.payload for e in bus.published("sync.tick")] == [{"from": "thread"}] * 2
    assert app.schedules["ping"].spec == "every 1s"
    assert describe_schedule(app.schedules["plain"])["description"] == (
        "Runs in a thread, as a plain handler does."
    )


async def test_cron_in_a_time_zone_across_the_clocks_going_forward() -> None:
    app = App("sched-cron")

    @app.schedule("30 1 * * *", topic="nightly", timezone="Europe/London")
    def nightly(tick: datetime) -> dict[str, str]:
        return {"local": tick.astimezone(LONDON).isoformat()}

    # 2026-03-29: the clocks go from 01:00 to 02:00 in London; 01:30 does not exist.
    async with TestApp(app, now=datetime(2026, 3, 28, 12, tzinfo=LONDON)) as bus:
        await bus.advance(3 * 86_400)
        assert [e.payload["local"] for e in bus.published("nightly")] == [
            "2026-03-29T02:00:00+01:00",  # the first instant after the gap, once
            "2026-03-30T01:30:00+01:00",
            "2026-03-31T01:30:00+01:00",
        ]


@pytest.mark.parametrize("catch_up", [False, True])
async def test_catch_up_after_a_time_without_workers(catch_up: bool) -> None:
    app = App(f"sched-catch-{catch_up}")
    app.every(3600.0, topic="hourly", payload={}, catch_up=catch_up)
    start = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    async with TestApp(app, now=start) as bus:
        await bus.advance(3600)  # 01:00 fires
        await bus.advance(10 * 3600, offline=True)  # 02:00 .. 11:00 fall due, no worker runs
        # The first worker comes back at 11:30: half an hour after the last of them, past
        # the grace (a minute), so they were all missed.
        fired = [t.strftime("%H:%M") for t in ticks(bus, "hourly")]
        assert fired == (["01:00", "11:00"] if catch_up else ["01:00"])
        state = await bus.broker.get_value(state_key(app.name, "hourly"))
        assert state is not None
        decoded = ScheduleState.decode(state)
        assert decoded.outcome == ("fired" if catch_up else "missed")
        await bus.advance(7200)  # then every tick again
        fired = [t.strftime("%H:%M") for t in ticks(bus, "hourly")]
        assert fired[-2:] == ["12:00", "13:00"]


async def test_a_function_that_raises_fails_its_tick_only(caplog: pytest.LogCaptureFixture) -> None:
    app = App("sched-fail")
    calls: list[datetime] = []

    @app.every(1.0, topic="flaky")
    async def flaky(tick: datetime) -> dict[str, int] | None:
        calls.append(tick)
        if len(calls) == 2:
            raise RuntimeError("model down")
        if len(calls) == 3:
            return None  # nothing to publish this tick
        return {"n": len(calls)}

    async with TestApp(app) as bus:
        await bus.advance(2)
        data = await bus.broker.get_value(state_key(app.name, "flaky"))
        assert data is not None
        state = ScheduleState.decode(data)
        assert (state.outcome, state.error) == ("failed", "RuntimeError: model down")
        await bus.advance(2)
        assert [e.payload for e in bus.published("flaky")] == [{"n": 1}, {"n": 4}]
    assert len(calls) == 4
    assert "schedule failed" in caplog.text


async def test_payloads_are_checked_against_the_agents_types() -> None:
    app = App("sched-types")

    class Due(BaseModel):
        day: str

    @app.agent("due")
    async def on_due(event: Due) -> None:
        pass

    with pytest.raises(PayloadValidationError):
        app.every(60.0, topic="due", payload={"wrong": 1})

    @app.every(1.0, topic="due")
    async def bad() -> dict[str, int]:
        return {"wrong": 1}

    async with TestApp(app) as bus:
        await bus.advance(1)
        assert bus.published("due") == []
        data = await bus.broker.get_value(state_key(app.name, "bad"))
        assert data is not None and "PayloadValidationError" in (
            ScheduleState.decode(data).error or ""
        )


def test_declaration_errors() -> None:
    app = App("sched-errors")
    app.every(1.0, topic="a", payload={})
    with pytest.raises(ValueError, match="already registered"):
        app.every(2.0, topic="a", payload={})
    with pytest.raises(ValueError, match="never fires"):
        app.schedule("0 0 30 2 *", topic="b", payload={})
    with pytest.raises(ValueError, match="unknown time zone"):
        app.schedule("@daily", topic="b", timezone="Mars/Olympus", payload={})
    with pytest.raises(ValueError, match="at least 1 ms"):
        app.every(0, topic="b", payload={})
    with pytest.raises(ValueError, match="not both"):
        app.every(5.0, topic="c", payload={})(lambda: {})
    with pytest.raises(TypeError, match="no argument, or one"):

        @app.every(5.0, topic="d")
        def two(a: int, b: int) -> None: ...


async def test_inspection_shows_schedules_as_publishers() -> None:
    app = App("sched-topology")

    @app.schedule("*/5 * * * *", topic="report.due", timezone="Europe/London")
    async def report() -> dict[str, int]:
        """The five-minute report."""
        return {}

    @app.agent("report.due")
    async def handle(event: dict[str, Any]) -> None:
        pass

    topology = app.topology()
    assert topology.topics["report.due"].producers == ("report",)
    assert topology.schedules == ("report",)
    assert "{{" in topology.to_mermaid() and "hexagon" in topology.to_dot()
    document = asyncapi_document(app)
    operation = document["operations"]["report_schedule"]
    assert operation["action"] == "send"
    assert operation["x-omnidaemon-schedule"]["timezone"] == "Europe/London"


async def test_two_workers_on_one_bus_fire_each_tick_once() -> None:
    broker = MemoryBroker()
    app = App("sched-fleet", broker=broker)
    app.every(1.0, topic="tick", payload={})
    a, b = ScheduleRunner(app, "a"), ScheduleRunner(app, "b")
    now = 1_000_000.0
    await a.drive(now)
    await b.drive(now)
    spec = app.schedules["tick"]
    # `a` claims the next tick and dies before publishing: `b` waits out the lease.
    answer, _ = await broker.update_value(
        state_key(app.name, "tick"), states.claim(now + 1, "a", now + 1)
    )
    assert answer == "mine"
    wake = await b.process(spec, now + 1)
    assert wake == now + 1 + LEASE or wake == now + 2  # look again at the next tick at latest
    await b.process(spec, now + 2)
    assert (await broker.describe("tick")) is None  # nothing fired while the claim held
    await b.process(spec, now + 1 + LEASE + 0.5)  # the lease ran out: b fires 1.., in order
    for runner in (a, b):
        await runner.process(spec, now + 1 + LEASE + 0.5)
    fired = [
        datetime.fromisoformat(Envelope[Any].model_validate_json(data).headers[TICK_HEADER])
        for _, data in await broker.entries("tick", 100)
    ]
    assert [t.timestamp() for t in fired] == [now + k for k in range(1, int(LEASE) + 2)]


@pytest.mark.parametrize("catch_up", [False, True])
async def test_a_state_without_any_stamp_counts_its_past_as_missed(catch_up: bool) -> None:
    # The watch value is gone (purged by hand): nothing says a worker ran the schedule, so
    # the ticks since its last settled one are missed, not a backlog to fire one by one.
    broker = MemoryBroker()
    app = App("sched-unstamped", broker=broker)
    app.every(3600.0, topic="tick", payload={}, catch_up=catch_up)
    now = 2_000_000.0  # 2000 s past the last tick: past the grace, that tick was missed too
    await broker.update_value(state_key(app.name, "tick"), states.start(now - 10 * 3600))
    await ScheduleRunner(app, "a").drive(now)
    entries = await broker.entries("tick", 10_000)
    assert len(entries) == (1 if catch_up else 0)


def test_workers_run_schedules_unless_told_not_to() -> None:
    from omnidaemon.errors import ConfigurationError
    from omnidaemon.worker.runner import Worker

    app = App("sched-workers", broker=MemoryBroker())
    app.every(1.0, topic="tick", payload={})
    assert Worker(app).schedules is not None  # an app of schedules alone runs
    with pytest.raises(ConfigurationError, match="no agents"):
        Worker(app, schedules=False)

    @app.agent("tick")
    async def on_tick(event: dict[str, Any]) -> None:
        pass

    assert Worker(app, agents=["on_tick"]).schedules is not None  # whatever agents it runs
    assert Worker(app, schedules=False).schedules is None
