"""Priorities in-process, on `TestApp`'s memory bus: under a backlog an agent starts high
events first while the starvation guard keeps normal and low ones moving (exact shares, since
with `concurrency=1` every fetch takes one event), publish order within a lane, `ctx.priority`
and what a handler publishes (`ctx.publish`, `ctx.publish_sync`, its return value to
`publishes=` and `reply_to`) keeping it, retries and dead letters in the event's lane, the int
mapping, `request` and `publish_many` with a priority, and invalid priorities refused before
anything reaches the bus. The same guarantees across worker processes on real buses are in
`test_priorities_processes.py`.

The last tests are regressions found with priorities: a lane event published as the block
starts, `published(topic)` and `dead_letters(agent)` across lanes, `advance()` with a lane
event in a timed handler, and an idle agent's wake-up latency on the lanes path.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from omnidaemon import App, Context
from omnidaemon.brokers.base import Subscription
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.lanes import LANES, Lane, lane_topic, lanes_mark_key
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio

Event = dict[str, Any]
GUARD = 10  # real seconds before a test that hangs fails (each takes well under 1 s)
EACH = 60  # events per lane in the backlog


def make_app() -> App:
    return App("t", broker="memory://")


def bus_topics(bus: TestApp) -> list[str]:
    """The bus topics of everything published in the block, in order."""
    return [topic for topic, _ in bus.broker.log]


# Order under a backlog --------------------------------------------------------------------


async def test_a_backlog_starts_high_first_and_the_guard_moves_normal_and_low() -> None:
    app = make_app()
    starts: list[tuple[Lane, int]] = []
    holding, release = anyio.Event(), anyio.Event()

    @app.agent("p.work", concurrency=1)
    async def work(event: Event, ctx: Context) -> None:
        if event.get("hold"):
            # Holds the agent's one slot while the backlog is published: no fetch meanwhile.
            holding.set()
            await release.wait()
            return
        starts.append((ctx.priority, event["n"]))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.work", {"hold": True})
            await holding.wait()
            # Lowest first, so that publish order alone would start them the other way round.
            for lane in ("low", "normal", "high"):
                for n in range(EACH):
                    await bus.publish("p.work", {"n": n}, priority=lane)
            release.set()
            await bus.drain()

    lanes = [lane for lane, _ in starts]
    assert Counter(lanes) == {"high": EACH, "normal": EACH, "low": EACH}
    # Each fetch takes one event: of any 16 consecutive fetches, 12 start with high, 3 with
    # normal (every 4th) and 1 with low (every 16th), whatever the count of fetches before.
    assert Counter(lanes[:32]) == {"high": 24, "normal": 6, "low": 2}, lanes[:32]
    for first in range(0, 64 - 16 + 1):  # high holds out for 80 starts (60 of 12 in 16)
        window = Counter(lanes[first : first + 16])
        assert window == {"high": 12, "normal": 3, "low": 1}, (first, lanes[first : first + 16])
    # High runs out first, then normal (15 of 16 fetches once high is empty), then low.
    last = {lane: max(i for i, got in enumerate(lanes) if got == lane) for lane in LANES}
    assert last["high"] < last["normal"] < last["low"], last
    # Within a lane, publish order.
    for lane in LANES:
        assert [n for got, n in starts if got == lane] == list(range(EACH)), lane


async def test_publish_order_holds_within_each_lane_with_concurrent_handlers() -> None:
    app = make_app()
    starts: dict[str, list[int]] = {lane: [] for lane in LANES}

    @app.agent("p.order", concurrency=8)
    async def order(event: Event, ctx: Context) -> None:
        starts[ctx.priority].append(event["n"])

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for n in range(50):
                for lane in ("low", "high", "normal"):
                    await bus.publish("p.order", {"n": n}, priority=lane)
            await bus.drain()
    assert starts == {lane: list(range(50)) for lane in LANES}


# What the handler sees and publishes ------------------------------------------------------


async def test_ctx_priority_is_the_lane_and_what_the_handler_publishes_keeps_it() -> None:
    app = make_app()
    seen: dict[str, Lane] = {}
    outputs: list[tuple[str, str, Lane]] = []

    @app.agent("p.in", publishes="p.ret")
    async def incoming(event: Event, ctx: Context) -> Event:
        src = event["src"]
        seen[src] = ctx.priority
        await ctx.publish("p.out", {"src": src, "how": "inherited"})
        await ctx.publish("p.out", {"src": src, "how": "low"}, priority="low")
        await ctx.publish("p.out", {"src": src, "how": "9"}, priority=9)
        await ctx.publish("p.out", {"src": src, "how": "normal"}, priority="normal")
        return {"src": src, "how": "returned"}

    @app.agent("p.sync")
    def sync_handler(event: Event, ctx: Context) -> None:  # plain def: ctx.publish_sync
        ctx.publish_sync("p.out", {"src": event["src"], "how": "sync"})

    @app.agent("p.out")
    async def out(event: Event, ctx: Context) -> None:
        outputs.append((event["src"], event["how"], ctx.priority))

    @app.agent("p.ret")
    async def returned(event: Event, ctx: Context) -> None:
        outputs.append((event["src"], event["how"], ctx.priority))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for lane in LANES:
                await bus.publish("p.in", {"src": lane}, priority=lane)
                await bus.publish("p.sync", {"src": lane}, priority=lane)
            await bus.drain()
            marks = {t: await bus.broker.get_value(lanes_mark_key(t)) for t in ("p.in", "p.out")}

    assert seen == {"high": "high", "normal": "normal", "low": "low"}
    expected = {
        (src, how, lane)
        for src in LANES
        for how, lane in [
            ("inherited", src),
            ("sync", src),
            ("returned", src),
            ("low", "low"),
            ("9", "high"),
            ("normal", "normal"),
        ]
    }
    assert set(outputs) == expected
    assert len(outputs) == len(expected)
    # On the bus: the high and low lanes are topics of their own; the normal lane is the topic.
    topics = Counter(bus_topics(bus))
    assert topics["p.in#high"] == topics["p.in#low"] == topics["p.in"] == 1
    assert topics["p.ret#high"] == topics["p.ret#low"] == topics["p.ret"] == 1
    assert topics["p.out#high"] == 2 + 3  # inherited and sync of the high one; `9` of each
    assert topics["p.out#low"] == 2 + 3
    assert topics["p.out"] == 2 + 3
    assert marks == {"p.in": b"1", "p.out": b"1"}  # publishers marked the lanes as used


async def test_a_return_value_sent_to_reply_to_keeps_the_priority() -> None:
    app = make_app()
    replies: list[tuple[int, Lane]] = []

    @app.agent("p.ask")
    async def ask(event: Event, ctx: Context) -> Event:
        return {"n": event["n"] * 2}

    @app.agent("p.replies")
    async def collect(event: Event, ctx: Context) -> None:
        replies.append((event["n"], ctx.priority))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.ask", {"n": 1}, reply_to="p.replies", priority="high")
            await bus.publish("p.ask", {"n": 2}, reply_to="p.replies", priority=1)
            await bus.drain()
    assert sorted(replies) == [(2, "high"), (4, "low")]
    assert bus_topics(bus).count("p.replies#high") == bus_topics(bus).count("p.replies#low") == 1


async def test_events_of_a_topic_whose_lanes_are_unused_stay_on_the_topic_unmarked() -> None:
    app = make_app()
    seen: list[Lane] = []

    @app.agent("p.plain", publishes="p.next")
    async def plain(event: Event, ctx: Context) -> Event:
        seen.append(ctx.priority)
        await ctx.publish("p.next", {"from": "publish"})
        return {"from": "return"}

    @app.agent("p.next")
    async def after(event: Event, ctx: Context) -> None:
        seen.append(ctx.priority)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.plain", {})
            await bus.publish("p.plain", {}, priority="normal")
            await bus.publish("p.plain", {}, priority=5)
            await bus.drain()
            marks = [await bus.broker.get_value(lanes_mark_key(t)) for t in ("p.plain", "p.next")]
    assert seen == ["normal"] * 9
    assert sorted(set(bus_topics(bus))) == ["p.next", "p.plain"]
    assert marks == [None, None]


# Retries and dead letters -----------------------------------------------------------------


async def test_a_retry_stays_in_the_events_lane() -> None:
    app = make_app()
    attempts: list[tuple[int, int, Lane]] = []

    @app.agent("p.flaky", max_retries=2)
    async def flaky(event: Event, ctx: Context) -> None:
        attempts.append((event["n"], ctx.attempt, ctx.priority))
        if ctx.attempt == 1:
            raise RuntimeError("down once")

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.flaky", {"n": 1}, priority="high")
            await bus.publish("p.flaky", {"n": 2}, priority="low")
            await bus.publish("p.flaky", {"n": 3})
            await bus.drain()
    assert sorted(attempts) == [
        (1, 1, "high"),
        (1, 2, "high"),
        (2, 1, "low"),
        (2, 2, "low"),
        (3, 1, "normal"),
        (3, 2, "normal"),
    ]


async def test_a_lane_events_dead_letter_goes_to_that_lanes_queue() -> None:
    app = make_app()

    @app.agent("p.fails", max_retries=1)
    async def fails(event: Event, ctx: Context) -> None:
        raise RuntimeError(f"no {ctx.priority}")

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            high_id = await bus.publish("p.fails", {"n": 1}, priority="high")
            low_id = await bus.publish("p.fails", {"n": 2}, priority=0)
            await bus.drain()
    queues = {
        lane: bus.broker.dead_letters_now(Subscription(lane_topic("p.fails", lane), "fails"))
        for lane in LANES
    }
    assert {lane: len(records) for lane, records in queues.items()} == {
        "high": 1,
        "normal": 0,
        "low": 1,
    }
    [high] = [DeadLetter.decode(record) for _, record in queues["high"]]
    [low] = [DeadLetter.decode(record) for _, record in queues["low"]]
    assert (high.event_id, high.error_message, high.attempts) == (high_id, "no high", 2)
    assert (low.event_id, low.error_message, low.attempts) == (low_id, "no low", 2)
    assert high.topic == low.topic == "p.fails"  # the topic, not the lane's bus topic


# Values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["urgent", "HIGH", "7", "", 10, -1, True, False, 2.5, 7.0, [7]],
    ids=repr,
)
async def test_an_invalid_priority_is_refused_before_anything_is_sent(bad: Any) -> None:
    app = make_app()
    refused: list[str] = []

    @app.agent("p.any")
    async def anything(event: Event, ctx: Context) -> None:
        try:
            await ctx.publish("p.other", {}, priority=bad)
        except ValueError as exc:
            refused.append(str(exc))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            topics = await bus.broker.topics()
            with pytest.raises(ValueError, match="invalid priority"):
                await bus.publish("p.any", {}, priority=bad)
            with pytest.raises(ValueError, match="invalid priority"):
                await app.publish_many([("p.any", {}), ("p.other", {})], priority=bad)
            with pytest.raises(ValueError, match="invalid priority"):
                await app.request("p.any", {}, priority=bad, timeout=5)
            assert bus.broker.log == []
            assert await bus.broker.topics() == topics  # not even a reply topic
            assert await bus.broker.get_value(lanes_mark_key("p.any")) is None
            # A handler's publish with a bad priority fails there, before sending.
            await bus.publish("p.any", {})
            await bus.drain()
            assert bus_topics(bus) == ["p.any"]
    assert len(refused) == 1
    assert "invalid priority" in refused[0]


async def test_int_priorities_map_to_lanes() -> None:
    app = make_app()
    seen: dict[int, Lane] = {}

    @app.agent("p.ints")
    async def ints(event: Event, ctx: Context) -> None:
        seen[event["p"]] = ctx.priority

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for p in range(10):
                await bus.publish("p.ints", {"p": p}, priority=p)
            await bus.drain()
    lanes: dict[int, Lane] = {p: "high" if p >= 7 else "low" if p <= 2 else "normal" for p in seen}
    assert seen == lanes
    assert sorted(seen) == list(range(10))
    assert [seen[p] for p in (9, 7, 5, 2, 0)] == ["high", "high", "normal", "low", "low"]
    assert bus_topics(bus) == [lane_topic("p.ints", lanes[p]) for p in range(10)]


async def test_request_with_a_priority_is_handled_in_that_lane() -> None:
    app = make_app()

    @app.agent("p.quote")
    async def quote(event: Event, ctx: Context) -> Event:
        return {"n": event["n"], "lane": ctx.priority}

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            high = await app.request("p.quote", {"n": 1}, priority="high", timeout=5)
            low = await app.request("p.quote", {"n": 2}, priority=2, timeout=5)
            normal = await app.request("p.quote", {"n": 3}, timeout=5)
            await bus.drain()
    assert (high, low, normal) == (
        {"n": 1, "lane": "high"},
        {"n": 2, "lane": "low"},
        {"n": 3, "lane": "normal"},
    )
    # The requests went to the lanes; the replies to their own reply topics, not to a lane.
    requests = [t for t in bus_topics(bus) if t.startswith("p.quote")]
    assert requests == ["p.quote#high", "p.quote#low", "p.quote"]
    assert not [t for t in bus_topics(bus) if not t.startswith("p.quote") and "#" in t]


async def test_publish_many_puts_every_event_of_the_batch_in_the_lane() -> None:
    app = make_app()
    seen: list[tuple[str, str, Lane]] = []

    @app.agent("p.x")
    async def x(event: Event, ctx: Context) -> None:
        seen.append(("x", ctx.event.id, ctx.priority))

    @app.agent("p.y")
    async def y(event: Event, ctx: Context) -> None:
        seen.append(("y", ctx.event.id, ctx.priority))

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            low = await app.publish_many([("p.x", {}), ("p.y", {})], priority="low")
            high = await app.publish_many([("p.x", {}), ("p.y", {})], priority=8)
            normal = await app.publish_many([("p.x", {}), ("p.y", {})])
            await bus.drain()
    assert sorted(seen) == sorted(
        [
            ("x", low[0], "low"),
            ("y", low[1], "low"),
            ("x", high[0], "high"),
            ("y", high[1], "high"),
            ("x", normal[0], "normal"),
            ("y", normal[1], "normal"),
        ]
    )
    assert bus_topics(bus) == ["p.x#low", "p.y#low", "p.x#high", "p.y#high", "p.x", "p.y"]


# Regressions found with priorities ----------------------------------------------------------


async def test_drain_waits_for_a_lane_event_published_as_the_block_starts() -> None:
    # The agent's group must be on the lanes when the block starts, not at its first fetch:
    # until it is, drain() sees no unread lane event and returns.
    app = make_app()
    seen: list[Lane] = []

    @app.agent("p.early")
    async def early(event: Event, ctx: Context) -> None:
        seen.append(ctx.priority)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.early", {}, priority="high")
            await bus.drain()
            assert seen == ["high"]


async def test_published_by_topic_lists_the_topics_lane_events() -> None:
    # A lane's events are on the bus topic '<topic>#high' (or '#low').
    app = make_app()

    @app.agent("p.listed")
    async def listed(event: Event, ctx: Context) -> None:
        pass

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for lane in LANES:
                await bus.publish("p.listed", {"lane": lane}, priority=lane)
            await bus.drain()
            assert [e.payload["lane"] for e in bus.published("p.listed")] == list(LANES)


async def test_dead_letters_lists_those_of_every_lane() -> None:
    app = make_app()

    @app.agent("p.dead", max_retries=0)
    async def dead(event: Event, ctx: Context) -> None:
        raise RuntimeError("no")

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            ids = {await bus.publish("p.dead", {}, priority=lane) for lane in LANES}
            await bus.drain()
            assert {letter.event_id for letter in bus.dead_letters("dead")} == ids


async def test_advance_times_out_a_hung_handler_of_a_lane_event() -> None:
    # advance() waits until the event is inside its handler (counting the deliveries of every
    # lane's group), so the clock it moves times the attempt out.
    app = make_app()
    attempts: list[tuple[int, Lane]] = []

    @app.agent("p.hangs", timeout=5, max_retries=1)
    async def hangs(event: Event, ctx: Context) -> None:
        attempts.append((ctx.attempt, ctx.priority))
        if ctx.attempt == 1:
            await anyio.sleep(3600)

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            await bus.publish("p.hangs", {}, priority="high")
            await bus.advance(6, timeout=2)
            assert attempts == [(1, "high"), (2, "high")]


async def test_an_idle_agent_starts_an_event_at_once() -> None:
    # An idle agent waits on every lane at once; once one delivers, the others' waits are
    # ended, without a pause of _INTERRUPT_EVERY (50 ms) once they all have (0.5 ms before
    # priorities; 52 ms with the pause).
    app = make_app()
    delays: list[float] = []

    @app.agent("p.idle")
    async def idle(event: Event, ctx: Context) -> None:
        delays.append(time.perf_counter() - event["at"])

    with anyio.fail_after(GUARD):
        async with TestApp(app) as bus:
            for lane in [*LANES] * 4:
                await anyio.sleep(0.02)  # not synchronisation: the agent idles, in its fetch
                await bus.publish("p.idle", {"at": time.perf_counter()}, priority=lane)
                await bus.drain()
    assert len(delays) == 12
    assert statistics.median(delays) < 0.02, delays
