"""Inspection and admin see a topic with its priority lanes as one topic (`omnidaemon.lanes_view`):
listing, describing, entries, dead letters, replay, purge, delete, metrics and an event's
progress, on the in-memory bus and on a real Redis, with the CLI as real subprocesses too."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
import pytest
from pydantic import BaseModel

from omnidaemon import App, Context, admin
from omnidaemon.brokers import Broker, MemoryBroker, RedisBroker, Subscription
from omnidaemon.brokers.base import ConsumerInfo, GroupInfo, TopicInfo
from omnidaemon.brokers.nats import NatsBroker
from omnidaemon.cli import main as cli_main
from omnidaemon.compat import OmniDaemonSDK
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import Envelope
from omnidaemon.errors import NotFound
from omnidaemon.fleet import _fold_lanes, bus_stats, describe_topics, fleet_metrics
from omnidaemon.lanes import Lane, lane_topic
from omnidaemon.lanes_view import describe_with_lanes, merge_lanes, topic_lanes
from omnidaemon.progress import event_progress
from tests.servers import RedisServer

TOPIC = "orders.placed"
HIGH = lane_topic(TOPIC, "high")

# kind -> (request, bus name) -> a broker; brokers made with one bus name share one bus.
BROKERS: dict[str, Callable[[pytest.FixtureRequest, str], Broker]] = {
    "memory": lambda request, name: MemoryBroker(name),
    "nats": lambda request, name: NatsBroker(request.getfixturevalue("nats_url"), prefix=name),
    "redis": lambda request, name: RedisBroker(request.getfixturevalue("redis_url"), prefix=name),
}


class Job(BaseModel):
    n: int
    fail: bool = False


@pytest.fixture(params=sorted(BROKERS))
def make_broker(request: pytest.FixtureRequest) -> Callable[[], Broker]:
    """Makes unconnected brokers on one bus of the test's own (a key prefix on Redis)."""
    factory, name = BROKERS[request.param], f"lanes{uuid.uuid4().hex[:12]}"
    return lambda: factory(request, name)


@pytest.fixture
async def app(make_broker: Callable[[], Broker]) -> Any:
    """A publishing app (no agents) on the test's bus, its broker connected."""
    publisher = App("lanes", broker=make_broker())
    await publisher.connect()
    try:
        yield publisher
    finally:
        await publisher.close()


async def subscribe(broker: Broker, agent: str, *lanes: Lane) -> None:
    """The agent's group on the topic and on each of `lanes`, as a worker makes them."""
    for lane in ("normal", *lanes):
        await broker.subscribe(Subscription(lane_topic(TOPIC, lane), agent))


async def dead_letter_one(broker: Broker, agent: str, lane: Lane = "high") -> str:
    """Take the lane's oldest event for `agent` and dead-letter it as a worker does."""
    sub = Subscription(lane_topic(TOPIC, lane), agent)
    [delivery] = await broker.fetch(sub, "c1", 1, 2.0)
    envelope = Envelope[Any].model_validate_json(delivery.data)
    record = DeadLetter(
        event_id=envelope.id,
        topic=TOPIC,
        agent=agent,
        entry=delivery.data.decode(),
        error_type="RuntimeError",
        error_message="boom",
        attempts=1,
        failed_at=datetime.now(UTC),
    )
    assert await broker.dead_letter(sub, delivery, record.encode())
    return envelope.id


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


# Merging, pure -----------------------------------------------------------------------------


def test_merge_lanes_sums_counts_keeps_the_largest_consumers_and_ages_and_merges_consumers() -> (
    None
):
    def group(topic: str, name: str, lag: int | None, age: float | None, *c: ConsumerInfo) -> Any:
        return GroupInfo(topic, name, len(c), len(c), lag, 1, 2, age, c)

    w1, w2 = ConsumerInfo("w1", 1, 5.0), ConsumerInfo("w2", 2, 1.0)
    normal = TopicInfo(TOPIC, 3, 1, (group(TOPIC, "a", 2, 4.0, w1, w2),), 100)
    high = TopicInfo(
        HIGH,
        5,
        2,
        (group(HIGH, "a", 4, 9.0, ConsumerInfo("w1", 3, 2.0)), group(HIGH, "b", None, None)),
        None,
    )
    merged = merge_lanes(TOPIC, {"normal": normal, "high": high})
    assert merged is not None
    assert (merged.topic, merged.length, merged.delayed) == (TOPIC, 8, 3)
    assert merged.delayed_bytes is None  # unknown on one lane: unknown for the topic
    a, b = merged.groups
    assert (a.topic, a.group, a.consumers, a.pending, a.lag, a.retries, a.dead_letters) == (
        TOPIC,
        "a",
        2,
        3,
        6,
        2,
        4,
    )
    assert a.oldest_pending_age == 9.0
    assert a.consumer_details == (ConsumerInfo("w1", 4, 2.0), ConsumerInfo("w2", 2, 1.0))
    # A group of a lane alone is listed; a lane whose lag is unknown makes the sum unknown.
    assert (b.topic, b.group, b.lag, b.oldest_pending_age) == (TOPIC, "b", None, None)
    assert merge_lanes(TOPIC, {"normal": normal}) is normal
    assert merge_lanes(TOPIC, {}) is None


def test_lane_metrics_fold_into_their_topic_with_extremes_kept() -> None:
    folded = _fold_lanes(
        {
            (TOPIC, "a"): {"received": 1, "duration:max_us": 5, "duration:min_us": 3},
            (HIGH, "a"): {"received": 2, "duration:max_us": 9, "duration:min_us": 4},
            (lane_topic(TOPIC, "low"), "b"): {"received": 7},
        }
    )
    assert folded == {
        (TOPIC, "a"): {"received": 3, "duration:max_us": 9, "duration:min_us": 3},
        (TOPIC, "b"): {"received": 7},
    }


# On a bus ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_listing_and_describing_count_a_high_lane_backlog_in_its_topic(app: App) -> None:
    broker = app.broker
    await subscribe(broker, "work", "high")
    await app.publish(TOPIC, {"n": 1})
    for n in (2, 3, 4):
        await app.publish(TOPIC, {"n": n}, priority="high")
    await app.publish(TOPIC, {"n": 5}, priority="high", delay=600)
    await app.publish("alone.topic", {"n": 6}, priority="low")  # a lane without its topic

    assert HIGH in await broker.topics()
    assert list(await topic_lanes(broker)) == ["alone.topic", TOPIC]
    topics = await describe_topics(broker)
    assert [t.topic for t in topics] == ["alone.topic", TOPIC]
    info = topics[1]
    assert (info.length, info.delayed) == (4, 1)
    [group] = info.groups
    assert (group.topic, group.group, group.lag, group.pending) == (TOPIC, "work", 4, 0)
    assert topics[0].length == 1 and topics[0].groups == ()

    described = await admin.require_topic(broker, TOPIC, consumers=True)
    assert (described.length, described.groups[0].lag) == (4, 4)
    assert (await admin.require_group(broker, TOPIC, "work")).lag == 4
    stats = await bus_stats(broker)
    assert (stats.totals["topics"], stats.totals["entries"], stats.totals["lag"]) == (2, 5, 4)

    # A delivery in the lane counts as pending for the agent, with its consumer.
    await broker.fetch(Subscription(HIGH, "work"), "w1", 1, 2.0)
    found = await describe_with_lanes(broker, TOPIC, consumers=True)
    assert found is not None
    [group] = found.groups
    assert (group.pending, group.lag, group.consumers) == (1, 3, 1)
    assert [(c.name, c.pending) for c in group.consumer_details] == [("w1", 1)]


@pytest.mark.anyio
async def test_recent_entries_merge_the_lanes_in_time_order(app: App) -> None:
    await subscribe(app.broker, "work")
    lanes: list[Lane] = ["normal", "high", "normal", "low", "high"]
    for n, priority in enumerate(lanes):
        await app.publish(TOPIC, {"n": n}, priority=priority)
        await anyio.sleep(0.005)  # Redis orders by the stream id's millisecond
    entries = await admin.recent_entries(app.broker, TOPIC, 10)
    assert [(e["payload"]["n"], e.get("priority")) for e in entries] == [
        (0, None),
        (1, "high"),
        (2, None),
        (3, "low"),
        (4, "high"),
    ]
    assert [e["payload"]["n"] for e in await admin.recent_entries(app.broker, TOPIC, 2)] == [3, 4]


@pytest.mark.anyio
async def test_a_high_priority_dead_letter_is_listed_and_replayed_into_the_high_lane(
    make_broker: Callable[[], Broker],
) -> None:
    app = App("lanes", broker=make_broker())
    failing = {"on"}
    handled: list[tuple[int, str, int]] = []

    @app.agent(TOPIC, name="work", max_retries=0)
    async def work(job: Job, ctx: Context) -> None:
        if job.fail and failing:
            raise RuntimeError(f"job {job.n} failed")
        handled.append((job.n, ctx.priority, ctx.attempt))

    broker = app.broker
    # Published before the worker starts: it finds the lanes' mark on its first look.
    first = await app.publish(TOPIC, {"n": 1, "fail": True}, priority="high")
    async with app.running():

        async def dead_lettered(count: int) -> bool:
            return len((await admin.find_dead_letters(broker, topic=TOPIC)).letters) == count

        await eventually(lambda: dead_lettered(1))
        assert len(await broker.dead_letters(Subscription(HIGH, "work"), 10)) == 1
        assert await broker.dead_letters(Subscription(TOPIC, "work"), 10) == []

        [letter] = (await admin.find_dead_letters(broker, agent="work")).letters
        assert (letter.event_id, letter.topic, letter.agent) == (first, TOPIC, "work")
        assert [d.event_id for d in await app.dead_letters("work")] == [first]
        assert (await admin.require_group(broker, TOPIC, "work")).dead_letters == 1
        preview = await admin.preview_replay(broker, TOPIC, "work")
        assert ([d.event_id for d in preview.chosen], preview.total) == ([first], 1)
        assert (await admin.find_dead_letter(broker, TOPIC, "work", first)).event_id == first

        failing.clear()
        outcome = await admin.replay_dead_letters(broker, TOPIC, "work", event_ids={first})
        assert (outcome.replayed, outcome.event_ids, outcome.missing) == (1, (first,), ())
        await wait_for(lambda: bool(handled))
        assert handled == [(1, "high", 1)]  # back in the high lane, as a first attempt

        # The app's own replay, of a second one.
        failing.add("on")
        second = await app.publish(TOPIC, {"n": 2, "fail": True}, priority="high")
        await eventually(lambda: dead_lettered(1))
        failing.clear()
        assert [d.event_id for d in await app.dead_letters("work")] == [second]
        assert await app.replay_dead_letters("work") == 1
        await wait_for(lambda: len(handled) == 2)
        assert handled[1] == (2, "high", 1)


@pytest.mark.anyio
async def test_a_corrected_replay_goes_into_the_lane_of_its_dead_letter(app: App) -> None:
    broker = app.broker
    await subscribe(broker, "work", "high")
    await app.publish(TOPIC, {"n": 1}, priority="high")
    dead = await dead_letter_one(broker, "work")
    corrected = await admin.replay_corrected(
        broker, TOPIC, "work", dead, {"n": 2}, payload_type=Job
    )
    assert corrected.causation_id == dead
    lane = await broker.describe(HIGH)
    assert lane is not None and [(g.group, g.retries) for g in lane.groups] == [("work", 1)]
    with anyio.fail_after(10):  # another process's retry: seen within one fetch timeout
        while not (got := await broker.fetch(Subscription(HIGH, "work"), "c2", 1, 0.2)):
            pass
    assert Envelope[Any].model_validate_json(got[0].data).id == corrected.id
    assert (await admin.require_group(broker, TOPIC, "work")).dead_letters == 0


@pytest.mark.anyio
async def test_purging_and_deleting_a_topic_reach_its_lanes(app: App) -> None:
    broker = app.broker
    await subscribe(broker, "work", "high", "low")
    await subscribe(broker, "audit", "high")
    await app.publish(TOPIC, {"n": 1})
    for n in (2, 3):
        await app.publish(TOPIC, {"n": n}, priority="high")
    await app.publish(TOPIC, {"n": 4}, priority="low")
    await dead_letter_one(broker, "work")
    await dead_letter_one(broker, "audit")

    # Dead letters of one agent, then of every agent, on every lane.
    assert await admin.purge_dead_letters(broker, TOPIC, agent="work") == 1
    assert (await admin.require_group(broker, TOPIC, "audit")).dead_letters == 1
    calls: list[None] = []
    assert await admin.purge_dead_letters(broker, TOPIC, on_group=lambda: calls.append(None)) == 1
    assert len(calls) == 2

    # The backlog, keeping the groups.
    before = await admin.purge_backlog(broker, TOPIC)
    assert before.length == 4
    for lane in ("normal", "high", "low"):
        info = await broker.describe(lane_topic(TOPIC, lane))
        assert info is not None and info.length == 0 and info.groups
    after = await admin.require_topic(broker, TOPIC)
    assert sorted((g.group, g.lag, g.pending) for g in after.groups) == [
        ("audit", 0, 0),
        ("work", 0, 0),
    ]

    # The whole topic.
    await app.publish(TOPIC, {"n": 5}, priority="high")
    deleted = await admin.purge_topic(broker, TOPIC)
    assert (deleted.length, sorted(g.group for g in deleted.groups)) == (1, ["audit", "work"])
    assert await broker.topics() == []
    assert await describe_with_lanes(broker, TOPIC) is None
    with pytest.raises(NotFound):
        await admin.require_topic(broker, TOPIC)


@pytest.mark.anyio
async def test_fleet_metrics_show_one_row_per_agent_whatever_lane_wrote(app: App) -> None:
    broker = app.broker
    await subscribe(broker, "work", "high")
    await broker.ack(Subscription(TOPIC, "work"), [], stats={"received": 1})
    await broker.ack(Subscription(HIGH, "work"), [], stats={"received": 2})
    [snapshot] = await fleet_metrics(broker)
    assert (snapshot.topic, snapshot.agent, snapshot.received) == (TOPIC, "work", 3)


@pytest.mark.anyio
async def test_the_progress_of_a_high_priority_event_is_read_from_its_lane(app: App) -> None:
    broker = app.broker
    await subscribe(broker, "work", "high")
    await subscribe(broker, "late")  # has not started reading the lanes yet
    await app.publish(TOPIC, {"n": 0})
    event_id = await app.publish(TOPIC, {"n": 1}, priority="high")

    progress = await event_progress(broker, event_id)
    assert progress.topic == TOPIC
    assert [(a.agent, a.state) for a in progress.agents] == [
        ("late", "not_yet"),
        ("work", "not_yet"),
    ]

    sub = Subscription(HIGH, "work")
    deliveries = await broker.fetch(sub, "c1", 1, 2.0)
    await broker.ack(sub, deliveries)
    progress = await event_progress(broker, event_id)
    assert [(a.agent, a.state) for a in progress.agents] == [
        ("late", "not_yet"),
        ("work", "handled"),
    ]


@pytest.mark.anyio
async def test_the_compat_sdk_inspects_a_topic_with_its_lanes(
    make_broker: Callable[[], Broker],
) -> None:
    sdk = OmniDaemonSDK(event_bus=make_broker())
    try:
        broker = sdk.app.broker
        await sdk.app.connect()
        await subscribe(broker, "work", "high")
        await sdk.app.publish(TOPIC, {"n": 1})
        await sdk.app.publish(TOPIC, {"n": 2}, priority="high")
        await anyio.sleep(0.005)
        await sdk.app.publish(TOPIC, {"n": 3}, priority="high")
        dead = await dead_letter_one(broker, "work")

        entries = await sdk.inspect_stream(TOPIC)
        assert [e["data"]["payload"]["n"] for e in entries] == [1, 2, 3]
        [group] = await sdk.list_groups(TOPIC)
        assert (group["name"], group["lag"], group["dead_letters"]) == ("work", 2, 1)
        [letter] = await sdk.inspect_dlq(TOPIC)
        assert (letter["id"], letter["agent"]) == (dead, "work")
        assert [s["stream"] for s in await sdk.list_streams()] == [TOPIC]
        assert list((await sdk.get_bus_stats())["topics"]) == [TOPIC]
    finally:
        await sdk.shutdown()


# The CLI -----------------------------------------------------------------------------------


def test_the_bus_commands_see_a_topics_lanes(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"lanes{uuid.uuid4().hex[:8]}.jobs"
    high = lane_topic(topic, "high")

    def cli(*args: str, json: bool = True) -> Any:
        # The real command line, in this process (a process per command costs seconds).
        argv = [*args, "--broker", redis_server.url, *(["--json"] if json else [])]
        with pytest.raises(SystemExit) as exited:
            cli_main(argv)
        out, err = capsys.readouterr()
        assert exited.value.code == 0, err
        return orjson.loads(out) if json else out

    async def prepare() -> str:
        async with RedisBroker(redis_server.url) as broker:
            app = App("lanes", broker=broker)
            for name in (topic, high):
                await broker.subscribe(Subscription(name, "work"))
            await app.publish(topic, {"n": 1})
            for n in (2, 3):
                await app.publish(topic, {"n": n}, priority="high")
            sub = Subscription(high, "work")
            [delivery] = await broker.fetch(sub, "c1", 1, 2.0)
            envelope = Envelope[Any].model_validate_json(delivery.data)
            record = DeadLetter(
                event_id=envelope.id,
                topic=topic,
                agent="work",
                entry=delivery.data.decode(),
                error_type="RuntimeError",
                error_message="boom",
                attempts=1,
                failed_at=datetime.now(UTC),
            )
            assert await broker.dead_letter(sub, delivery, record.encode())
            return envelope.id

    dead = anyio.run(prepare)

    listed = cli("bus", "list")
    assert not [t["topic"] for t in listed if "#" in t["topic"]]
    [mine] = [t for t in listed if t["topic"] == topic]
    assert mine["length"] == 3
    # lag: one event in the topic, one of two in the high lane (the other dead-lettered)
    assert [(g["agent"], g["lag"], g["dead_letters"]) for g in mine["groups"]] == [("work", 2, 1)]
    [group] = cli("bus", "groups", topic)
    assert (group["agent"], group["lag"], group["dead_letters"]) == ("work", 2, 1)
    entries = cli("bus", "inspect", topic)
    assert [(e["payload"]["n"], e.get("priority")) for e in entries] == [
        (1, None),
        (2, "high"),
        (3, "high"),
    ]
    [letter] = cli("bus", "dlq", topic)
    assert (letter["event_id"], letter["topic"], letter["agent"]) == (dead, topic, "work")

    replayed = cli("bus", "replay", topic, "--agent", "work", "--all", json=False)
    assert replayed.strip().endswith(f"replayed 1 event to work on {topic}")
    assert cli("bus", "dlq", topic) == []

    async def lane_retries() -> int:
        async with RedisBroker(redis_server.url) as broker:
            info = await broker.describe(high)
            assert info is not None
            return info.groups[0].retries

    assert anyio.run(lane_retries) == 1  # back in the high lane, for `work` alone

    cli("bus", "purge", topic, "--keep-groups", "--yes", json=False)
    [emptied] = [t for t in cli("bus", "list") if t["topic"] == topic]
    assert emptied["length"] == 0 and emptied["groups"][0]["retries"] == 0
    cli("bus", "purge", topic, "--yes", json=False)
    assert not [t for t in cli("bus", "list") if t["topic"].startswith(topic)]
