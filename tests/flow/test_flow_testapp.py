"""Flow control in-process, on `TestApp`'s memory bus and its test clock.

`drain()` fast-forwards the bus clock to the next event put back by flow control, so limits
of seconds run in milliseconds while the handlers' `ctx.app.broker.clock()` readings show the
spacing the limits impose. Covered: rate limits (with a burst, and per key), budgets (debt from
`ctx.charge`, `estimate=` reservations and refunds, one budget shared by two agents),
per-key concurrency (its peak, and a key not held up by another's backlog), `expires=`,
the option and charge errors, key functions that raise, the `throttled`/`expired`/`wait`
metrics, `RateLimit.parse`, and that events which expire before their turns take no turns
in a limit's line. The same guarantees across worker processes on real buses are in
`test_flow_processes.py`.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import anyio
import pytest

from omnidaemon import App, Budget, Context, RateLimit
from omnidaemon.fleet import fleet_metrics
from omnidaemon.flow.gate import WAITED_HEADER
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio

Event = dict[str, Any]
SLACK = 0.05  # seconds of real time between an admission and the handler's clock reading
GUARD = 10  # real seconds before a test that hangs fails (each takes well under 1 s)
USER_KEY: dict[str, Any] = {"rate_limit_key": lambda e: e["user"]}  # a rate limit per user


def make_app() -> App:
    return App("t", broker="memory://")


def assert_within(starts: list[float], limit: RateLimit) -> None:
    """No window of `w` seconds holds more than `burst + w * rate` starts."""
    starts = sorted(starts)
    rate = limit.count / limit.per
    for i in range(len(starts)):
        for j in range(i, len(starts)):
            window = starts[j] - starts[i]
            assert j - i + 1 <= limit.burst + (window + SLACK) * rate, (i, j, window)


# Rate limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "events"),
    [(RateLimit.parse("10/s"), 30), (RateLimit(5, per=1, burst=3), 10)],
    ids=["10/s", "5/s-burst-3"],
)
async def test_rate_limit_spaces_starts_on_the_bus_clock(limit: RateLimit, events: int) -> None:
    app = make_app()
    starts: list[float] = []

    @app.agent("a.b", rate_limit=limit)
    async def limited(event: Event, ctx: Context) -> None:
        starts.append(ctx.app.broker.clock())

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(events):
                await bus.publish("a.b", {"i": i})
            await bus.drain(timeout=30)
    starts.sort()
    assert len(starts) == events
    assert_within(starts, limit)
    burst, interval = limit.burst, limit.interval
    assert starts[burst - 1] - starts[0] < SLACK  # the burst starts at once
    gaps = [b - a for a, b in pairwise(starts[burst - 1 :])]  # then one start per interval
    assert all(interval - SLACK <= gap <= interval + 0.15 for gap in gaps), gaps
    assert starts[-1] - starts[0] <= (events - burst) * interval + 0.6  # no slower than that


async def test_keyed_rate_limit_keys_progress_independently() -> None:
    app = make_app()
    starts: dict[str, list[float]] = {"x": [], "y": []}
    waited: dict[str, list[bool]] = {"x": [], "y": []}

    @app.agent("a.b", rate_limit="2/s", **USER_KEY)
    async def limited(event: Event, ctx: Context) -> None:
        starts[event["user"]].append(ctx.app.broker.clock())
        waited[event["user"]].append(WAITED_HEADER in ctx.event.headers)  # put back to wait

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(10):
                await bus.publish("a.b", {"user": "x", "i": i})
            await bus.publish("a.b", {"user": "y"})
            await bus.drain(timeout=30)
    first = min(starts["x"])
    assert max(starts["x"]) - first >= 4.5 - SLACK  # x's backlog: 0.5 s apart
    assert starts["y"][0] - first < 0.25  # y did not wait behind it (x waits 0.5 s a start)
    assert_within(starts["x"], RateLimit.parse("2/s"))
    assert waited == {"x": [False] + [True] * 9, "y": [False]}


# Budgets ----------------------------------------------------------------------------------


async def test_debt_from_a_charge_delays_the_next_start() -> None:
    app = make_app()
    starts: list[float] = []

    @app.agent("c.d", budgets=[Budget("tok", 1000, per="second")], concurrency=1)
    async def spend(event: Event, ctx: Context) -> None:
        starts.append(ctx.app.broker.clock())
        await ctx.charge("tok", 3000)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(4):
                await bus.publish("c.d", {"i": i})
            await bus.drain(timeout=30)
    gaps = [b - a for a, b in pairwise(sorted(starts))]
    assert len(gaps) == 3
    assert all(3.0 - SLACK <= gap <= 3.0 + 0.3 for gap in gaps), gaps  # 3000 units at 1000/s


async def test_estimate_reserves_up_front_and_a_smaller_charge_refunds() -> None:
    app = make_app()
    starts: list[float] = []
    charge = {"units": 500.0}

    @app.agent("c.d", budgets=[Budget("t", 1000, per="second")], estimate=lambda e: 500)
    async def spend(event: Event, ctx: Context) -> None:
        starts.append(ctx.app.broker.clock())
        await ctx.charge("t", charge["units"])

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(3):
                await bus.publish("c.d", {"i": i})
            await bus.drain(timeout=30)
            assert starts[1] - starts[0] < SLACK  # two reservations of 500 fit in 1000
            assert 0.5 - SLACK <= starts[2] - starts[0] <= 0.5 + 0.15  # the third waits
            # Refilled, then two starts that use 100 of their 500 each: 400 comes back from
            # each, leaving 800, so a fifth start fits at once (without refunds: 0.5 s later).
            await bus.advance(1.0)
            charge["units"] = 100.0
            for i in range(2):
                await bus.publish("c.d", {"i": i})
            await bus.drain(timeout=30)
            await bus.publish("c.d", {"i": 2})
            await bus.drain(timeout=30)
    assert starts[4] - starts[3] < SLACK
    assert starts[5] - starts[3] < 0.25  # 1000 - 2 * 100 = 800 left: 500 fits at once


async def test_a_shared_budget_is_one_budget() -> None:
    app = make_app()
    shared = Budget("shared", 1000, per="second")
    starts: dict[str, float] = {}

    @app.agent("a.b", budgets=[shared])
    async def first(event: Event, ctx: Context) -> None:
        starts["first"] = ctx.app.broker.clock()
        await ctx.charge("shared", 2000)

    @app.agent("c.d", budgets=[shared])
    def second(event: Event, ctx: Context) -> None:  # a plain def handler: charge_sync
        starts["second"] = ctx.app.broker.clock()
        ctx.charge_sync("shared", 1)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {})
            await bus.drain()
            await bus.publish("c.d", {})
            await bus.drain(timeout=30)
            assert bus.dead_letters("second") == []
    assert 2.0 - SLACK <= starts["second"] - starts["first"] <= 2.0 + 0.3  # first's debt

    with pytest.raises(ValueError, match=r"'shared'.*declare it once"):

        @app.agent("e.f", budgets=[Budget("shared", 500, per="second")])
        async def third(event: Event) -> None:
            pass

    assert set(app.budgets) == {"shared"}


# Per-key concurrency ----------------------------------------------------------------------


async def test_key_concurrency_caps_each_key_and_keys_take_turns() -> None:
    app = make_app()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    order: list[str] = []
    go = anyio.Event()  # A's handlers hold their slots until B has started

    @app.agent("a.b", key_concurrency=2, concurrency_key=lambda e: e["k"])
    async def work(event: Event) -> None:
        key = event["k"]
        order.append(key)
        running[key] += 1
        peak[key] = max(peak[key], running[key])
        if key == "A":
            await go.wait()
        await anyio.sleep(0.005)
        running[key] -= 1

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(50):
                await bus.publish("a.b", {"k": "A", "i": i})
            await bus.publish("a.b", {"k": "B"})
            # B starts while A's backlog waits for A's two slots, however slow the machine.
            while "B" not in order:
                await anyio.sleep(0.005)
            go.set()
            await bus.drain(timeout=30)
    assert Counter(order) == {"A": 50, "B": 1}
    assert peak == {"A": 2, "B": 1}
    assert order.index("B") < 2 + 5  # among the first starts after A's two running


# Expiry -----------------------------------------------------------------------------------


async def test_expires_dead_letters_what_would_start_too_late() -> None:
    app = make_app()
    ran: list[str] = []

    @app.agent("a.b", rate_limit="2/s", **USER_KEY)
    async def limited(event: Event) -> None:
        ran.append(event["name"])

    @app.agent("c.d")
    async def idle(event: Event) -> None:
        ran.append(event["name"])

    now = datetime.now(UTC)
    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(5):
                await bus.publish("a.b", {"user": "u", "name": f"backlog{i}"})
            late_event = {"user": "u", "name": "late"}
            await bus.publish("a.b", late_event, expires=timedelta(seconds=0.5))
            await bus.publish("c.d", {"name": "soon"}, expires=timedelta(seconds=5))
            await bus.publish("c.d", {"name": "aware"}, expires=now + timedelta(minutes=1))
            naive = now.replace(tzinfo=None)  # naive means UTC
            await bus.publish("c.d", {"name": "naive"}, expires=naive + timedelta(minutes=1))
            await bus.publish("c.d", {"name": "past"}, expires=naive - timedelta(seconds=1))
            # "late" would wait 2.5 s for its turn: it is dead-lettered at once, not when its
            # turn comes (the clock only moves in real time here, without drain()).
            with anyio.fail_after(1):
                while not bus.dead_letters("limited"):
                    await anyio.sleep(0.005)
            assert len([name for name in ran if name.startswith("backlog")]) < 5
            await bus.drain(timeout=30)
            [late] = bus.dead_letters("limited")
            [past] = bus.dead_letters("idle")
    assert (late.error_type, past.error_type) == ("Expired", "Expired")
    assert late.envelope is not None and late.envelope.payload == late_event
    assert past.envelope is not None and past.envelope.payload == {"name": "past"}
    assert sorted(ran) == sorted([*(f"backlog{i}" for i in range(5)), "soon", "aware", "naive"])

    for lifetime in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="positive lifetime"):
            await app.publish("c.d", {"name": "never"}, expires=lifetime)


# Errors -----------------------------------------------------------------------------------


def test_bad_flow_options_raise_at_decoration() -> None:
    app = make_app()

    def declare(**options: Any) -> None:
        @app.agent("a.b", **options)
        async def handler(event: Event) -> None:
            pass

    with pytest.raises(ValueError, match="<count>/<period>"):
        declare(rate_limit="ten per minute")
    with pytest.raises(ValueError, match="rate_limit_key needs a rate_limit"):
        declare(rate_limit_key=lambda e: e["k"])
    with pytest.raises(ValueError, match="key_concurrency needs concurrency_key"):
        declare(key_concurrency=2)
    with pytest.raises(ValueError, match="estimate= needs budgets"):
        declare(estimate=lambda e: 1)
    assert app.agents == {}


@pytest.mark.parametrize(
    ("budgets", "budget", "units", "match"),
    [
        ([Budget("tok", 10)], "unknown", 1.0, "budget 'unknown' (budgets: tok)"),
        (None, "unknown", 1.0, "budget 'unknown' (budgets: none)"),  # an app without budgets
        ([Budget("tok", 10)], "tok", -1.0, "a charge is a number of units >= 0"),
    ],
    ids=["unknown", "unknown-no-budgets", "negative"],
)
async def test_a_bad_charge_fails_the_handler(
    budgets: list[Budget] | None, budget: str, units: float, match: str
) -> None:
    app = make_app()
    attempts: list[int] = []

    @app.agent("a.b", budgets=budgets, max_retries=1)
    async def spend(event: Event, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await ctx.charge(budget, units)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {})
            await bus.drain()
            [letter] = bus.dead_letters("spend")
    assert attempts == [1, 2]
    assert (letter.error_type, letter.attempts) == ("ValueError", 2)
    assert match in letter.error_message


KEYED: dict[str, dict[str, Any]] = {
    "rate_limit_key": {"rate_limit": "10/s", "rate_limit_key": lambda e: e["missing"]},
    "concurrency_key": {"key_concurrency": 1, "concurrency_key": lambda e: e["missing"]},
    "estimate": {"budgets": [Budget("tok", 10)], "estimate": lambda e: e["missing"]},
}


@pytest.mark.parametrize("option", sorted(KEYED))
async def test_a_key_function_that_raises_fails_the_attempt(option: str) -> None:
    app = make_app()
    ran: list[Event] = []

    @app.agent("a.b", max_retries=2, **KEYED[option])
    async def keyed(event: Event) -> None:
        ran.append(event)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"k": 1})
            await bus.drain()
            [letter] = bus.dead_letters("keyed")
    assert (letter.error_type, letter.attempts) == ("KeyError", 3)
    assert ran == []


async def test_an_estimate_that_raises_leaves_the_keys_slot_free() -> None:
    app = make_app()
    ran: list[tuple[Event, float]] = []

    @app.agent(
        "a.b",
        max_retries=0,
        key_concurrency=1,
        concurrency_key=lambda e: e["user"],
        budgets=[Budget("tok", 1_000, per="second")],
        estimate=lambda e: e["units"],  # a KeyError when "units" is missing
    )
    async def keyed(event: Event, ctx: Context) -> None:
        ran.append((event, ctx.app.broker.clock()))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"user": "u"})  # its estimate raises: dead-lettered
            await bus.drain()
            published = app.broker.clock()
            await bus.publish("a.b", {"user": "u", "units": 1})
            await bus.drain()
            [letter] = bus.dead_letters("keyed")
    assert letter.error_type == "KeyError"
    [(event, started)] = ran
    assert event == {"user": "u", "units": 1}
    # At once: the key's one slot was not left taken until its lease (30 s) ran out.
    assert started - published < 1.0


# Metrics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [True, False])
async def test_metrics_count_throttled_waits_and_expiries(keyed: bool) -> None:
    app = make_app()

    @app.agent("a.b", rate_limit="10/s", **(USER_KEY if keyed else {}))
    async def limited(event: Event) -> None:
        pass

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for i in range(5):
                await bus.publish("a.b", {"user": "u", "i": i})
            await bus.publish("a.b", {"user": "u", "i": 5}, expires=timedelta(seconds=0.2))
            await bus.drain(timeout=30)
    [metrics] = await fleet_metrics(bus.broker, agent="limited")
    assert (metrics.succeeded, metrics.expired, metrics.dead_lettered) == (5, 1, 1)
    assert metrics.throttled >= 4  # each start after the first waited (some rechecked)
    assert metrics.wait.count == 4
    assert 0.4 - SLACK <= (metrics.wait.high or 0.0) <= 0.4 + 0.15  # the last waited 4 * 0.1 s


@pytest.mark.parametrize("keyed", [True, False])
async def test_expired_events_do_not_hold_up_live_ones(keyed: bool) -> None:
    app = make_app()
    starts: dict[str, float] = {}

    @app.agent("a.b", rate_limit="2/s", **(USER_KEY if keyed else {}))
    async def limited(event: Event, ctx: Context) -> None:
        starts[event["name"]] = ctx.app.broker.clock()

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("a.b", {"user": "u", "name": "first"})
            for i in range(8):  # they expire before their turns: dead-lettered, never run
                stale = {"user": "u", "name": f"stale{i}"}
                await bus.publish("a.b", stale, expires=timedelta(seconds=0.1))
            await bus.publish("a.b", {"user": "u", "name": "second"})
            await bus.drain(timeout=30)
            assert len(bus.dead_letters("limited")) == 8
            await bus.advance(2)  # idle: the limit allows a start at once again
            fresh = {"user": "u", "name": "fresh"}
            await bus.publish("a.b", fresh, expires=timedelta(seconds=1))
            await bus.drain(timeout=30)
    assert set(starts) == {"first", "second", "fresh"}  # today: "fresh" expires, unrun
    assert starts["second"] - starts["first"] < 0.5 + 0.25  # today: 4.5 s, 8 turns late


# RateLimit.parse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "per", "shown"),
    [
        ("60/m", 60, 60, "60/m"),
        ("10/s", 10, 1, "10/s"),
        ("5/10s", 5, 10, "5/10s"),
        ("1000/h", 1000, 3600, "1000/h"),
        ("2/minute", 2, 60, "2/m"),
        (" 3 / 2 hours ", 3, 7200, "3/7200s"),
        ("1.5/s", 1.5, 1, "1.5/s"),
        ("3/mins", 3, 60, "3/m"),
    ],
)
def test_rate_limit_parse(text: str, count: float, per: float, shown: str) -> None:
    limit = RateLimit.parse(text)
    assert (limit.count, limit.per, limit.burst) == (count, per, 1)
    assert str(limit) == shown
    assert RateLimit.parse(str(limit)) == limit
    assert limit.interval == pytest.approx(per / count)


def test_rate_limit_str_shows_its_burst_and_bad_values_raise() -> None:
    assert str(RateLimit(60, per=60, burst=10)) == "60/m (burst 10)"
    assert RateLimit.parse(RateLimit(5, per=1, burst=3)).burst == 3
    # "ms" is no plural of "m": it once parsed as minutes, 60 000 times too slow.
    for bad in ("ten per minute", "10", "/s", "10/fortnight", "0/s", "10/0s", "100/ms"):
        with pytest.raises(ValueError):
            RateLimit.parse(bad)
    with pytest.raises(ValueError, match="burst"):
        RateLimit(5, burst=0)
