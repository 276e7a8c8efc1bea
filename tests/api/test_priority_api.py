"""The `priority` field of `POST /v1/events` and `POST /v1/requests`, against Redis: the event
lands in its topic's lane and is handled with that priority; a value that is not one is 422
with the field named, and nothing is sent."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from omnidaemon import App, Context
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.lanes import LANES, Lane, lane_topic, lanes_mark_key
from tests.api._support import PUBLISHER, ServerThread, apoll, async_client
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


def fresh_topic(name: str) -> str:
    return f"{name}.t{uuid.uuid4().hex[:8]}"


async def lane_lengths(broker: RedisBroker, topic: str) -> dict[Lane, int]:
    """How many entries each of the topic's lanes holds (0 for a lane not on the bus)."""
    lengths: dict[Lane, int] = {}
    for lane in LANES:
        info = await broker.describe(lane_topic(topic, lane))
        lengths[lane] = 0 if info is None else info.length
    return lengths


@pytest.mark.parametrize(
    ("priority", "lane"),
    [
        ("high", "high"),
        (8, "high"),
        (9, "high"),
        (7, "high"),
        ("normal", "normal"),
        (6, "normal"),
        (3, "normal"),
        (None, "normal"),
        ("low", "low"),
        (2, "low"),
        (0, "low"),
    ],
    ids=repr,
)
async def test_a_published_event_lands_in_its_priority_lane(
    api_server: ServerThread,
    redis_server: RedisServer,
    bus_prefix: str,
    priority: Any,
    lane: Lane,
) -> None:
    topic = fresh_topic("lane")  # no agent reads it: the entry stays where it was sent
    async with (
        async_client(api_server.url, PUBLISHER) as http,
        RedisBroker(redis_server.url, prefix=bus_prefix) as broker,
    ):
        published = await http.post(
            "/v1/events", json={"topic": topic, "payload": {"n": 1}, "priority": priority}
        )
        assert published.status_code == 202, published.text
        assert published.json()["topic"] == topic  # the topic, not the lane's bus topic
        assert await lane_lengths(broker, topic) == {other: int(other == lane) for other in LANES}
        [(_, data)] = await broker.entries(lane_topic(topic, lane), 10)
        assert published.json()["event_id"].encode() in data
        # A lane other than normal is marked as used, so that workers start reading it.
        mark = await broker.get_value(lanes_mark_key(topic))
        assert (mark is not None) == (lane != "normal")


async def test_events_and_requests_are_handled_with_the_priority_sent(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    topic = fresh_topic("prio")
    worker = App("prioworker", broker=RedisBroker(redis_server.url, prefix=bus_prefix))
    seen: dict[int, Lane] = {}

    @worker.agent(topic, name="prio")
    async def prio(event: dict[str, int], ctx: Context) -> dict[str, Any]:
        seen[event["n"]] = ctx.priority
        return {"n": event["n"], "lane": ctx.priority}

    sent: dict[int, Any] = {1: "high", 2: 8, 3: "low", 4: 1, 5: "normal", 6: None}
    async with async_client(api_server.url, PUBLISHER) as http, worker.running():
        for n, priority in sent.items():
            body: dict[str, Any] = {"topic": topic, "payload": {"n": n}}
            if priority is not None:
                body["priority"] = priority
            published = await http.post("/v1/events", json=body)
            assert published.status_code == 202, published.text

        async def all_handled() -> bool:
            return len(seen) == len(sent)

        # A worker picks up a topic's lanes once it sees they are used (within seconds).
        await apoll(all_handled, timeout=20, message="every event handled")

        answered = await http.post(
            "/v1/requests",
            json={"topic": topic, "payload": {"n": 7}, "priority": "high", "timeout": 20},
        )
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"topic": topic, "reply": {"n": 7, "lane": "high"}}
        answered = await http.post(
            "/v1/requests",
            json={"topic": topic, "payload": {"n": 8}, "priority": 0, "timeout": 20},
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["reply"] == {"n": 8, "lane": "low"}
    assert seen == {
        1: "high",
        2: "high",
        3: "low",
        4: "low",
        5: "normal",
        6: "normal",
        7: "high",
        8: "low",
    }


INVALID: list[Any] = ["urgent", "HIGH", "7", "", 10, -1, True, 7.0, 7.5, [7], {"lane": "high"}]


@pytest.mark.parametrize("priority", INVALID, ids=repr)
@pytest.mark.parametrize("path", ["/v1/events", "/v1/requests"])
async def test_an_invalid_priority_is_422_naming_the_field_and_nothing_is_sent(
    api_server: ServerThread,
    redis_server: RedisServer,
    bus_prefix: str,
    path: str,
    priority: Any,
) -> None:
    topic = fresh_topic("bad")
    async with (
        async_client(api_server.url, PUBLISHER) as http,
        RedisBroker(redis_server.url, prefix=bus_prefix) as broker,
    ):
        body = {"topic": topic, "payload": {"n": 1}, "priority": priority, "timeout": 1}
        if path == "/v1/events":
            del body["timeout"]
        answer = await http.post(path, json=body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] == "invalid_request", answer.text
        message = answer.json()["message"]
        assert "body.priority" in message, message
        assert "'high', 'normal'" in message, message
        assert "Traceback" not in answer.text
        assert await lane_lengths(broker, topic) == {"high": 0, "normal": 0, "low": 0}
        assert await broker.get_value(lanes_mark_key(topic)) is None
