"""The app, the fleet and the bus over HTTP: agents, topics, groups, stats, metrics, health,
dead letters, replay and purge, against a real worker on Redis, on a Redis Cluster and on NATS
JetStream."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from omnidaemon import App
from omnidaemon.brokers import Broker
from omnidaemon.brokers.redis import RedisBroker
from tests.api._support import ADMIN, PUBLISHER, READER, ServerThread, apoll, async_client, make_app
from tests.api.conftest import LANES

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=["redis", "cluster", "nats"])
def make_bus_app(
    request: pytest.FixtureRequest, bus_prefix: str, failing: set[str]
) -> Callable[[], App]:
    """The module runs on the session's Redis, on its Redis Cluster (where listing scans
    every master and `stats` lists the nodes), then on its NATS server."""
    if request.param == "nats":
        url = request.getfixturevalue("nats_server").url
        return lambda: make_app(open_nats(url, bus_prefix), LANES, failing)
    fixture = "redis_server" if request.param == "redis" else "shared_cluster"
    url = request.getfixturevalue(fixture).url
    return lambda: make_app(RedisBroker(url, prefix=bus_prefix), LANES, failing)


def open_nats(url: str, prefix: str) -> Broker:
    from omnidaemon.brokers.nats import NatsBroker  # the NATS client only where it is used

    return NatsBroker(url, prefix=prefix)


async def _handled(http: httpx.AsyncClient, topic: str, n: int) -> str:
    """Publish a job to `topic` and wait until its agent finished it; its event id."""
    published = await http.post("/v1/events", json={"topic": topic, "payload": {"n": n}})
    assert published.status_code == 202, published.text
    event_id: str = published.json()["event_id"]
    finished = await http.get(f"/v1/events/{event_id}/result", params={"wait": 10})
    assert finished.status_code == 200, finished.text
    return event_id


async def test_agents_of_the_app(api_server: ServerThread) -> None:
    async with async_client(api_server.url, READER) as http:
        answer = await http.get("/v1/agents")
    assert answer.status_code == 200
    body = answer.json()
    assert body["app"] == "apitest"
    agents = {a["name"]: a for a in body["agents"]}
    assert set(agents) == set(LANES)
    handled = agents["handled"]
    assert handled["topic"] == LANES["handled"]
    assert handled["payload_type"] == "Job"
    assert handled["max_retries"] == 0
    assert handled["store_results"] is True
    assert handled["backoff"]["factor"] == 2.0


async def test_topics_groups_stats_metrics_and_health_see_the_worker(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    topic = LANES["handled"]
    async with async_client(api_server.url, READER) as reader:
        async with async_client(api_server.url, PUBLISHER) as publisher, make_bus_app().running():
            await _handled(publisher, topic, 1)

            # The result is stored before the delivery is acknowledged (acks are batched), so
            # the group may show it pending for a moment.
            async def acknowledged() -> tuple[dict[str, Any], dict[str, Any]] | None:
                topics = (await reader.get("/v1/topics")).json()["topics"]
                mine = next(t for t in topics if t["topic"] == topic)
                group = next(g for g in mine["groups"] if g["agent"] == "handled")
                return (mine, group) if group["pending"] == 0 else None

            mine, group = await apoll(acknowledged, message="the event to be acknowledged")
            assert mine["length"] >= 1
            assert group["lag"] == 0

            groups = (await reader.get(f"/v1/topics/{topic}/groups")).json()
            assert groups["topic"] == topic
            [group] = [g for g in groups["groups"] if g["agent"] == "handled"]
            assert group["consumers"] >= 1
            assert group["consumer_details"][0]["name"]

            stats = (await reader.get("/v1/stats")).json()
            assert stats["totals"]["topics"] >= 1
            assert stats["totals"]["workers"] == 1
            assert stats["workers"][0]["app"] == "apitest"
            assert stats["server"]["server"].startswith(("redis", "valkey", "nats"))
            assert ":***@" not in stats["bus"]
            if "cluster" in stats["server"]["server"]:
                masters = [n for n in stats["nodes"] if n["role"] == "master"]
                assert len(masters) == 3 and sum(n["slots"] for n in masters) == 16384
                assert sum(n["topics"] for n in masters) == stats["totals"]["topics"]
            else:
                assert stats["nodes"] == []

            health = await reader.get("/v1/health")
            assert health.status_code == 200
            assert health.json()["status"] in ("healthy", "degraded")
            assert health.json()["bus"]["reachable"] is True
            assert len(health.json()["workers"]) == 1

            # Workers write their counts to the bus at most once a second.
            async def counted() -> list[dict[str, Any]]:
                answer = await reader.get("/v1/metrics", params={"topic": topic})
                return [m for m in answer.json()["metrics"] if m["succeeded"] >= 1]

            [metrics] = await apoll(counted, message="the worker's metrics")
        assert metrics["agent"] == "handled"
        assert metrics["received"] >= 1
        assert metrics["duration_seconds"]["count"] >= 1
        duration = metrics["duration_seconds"]
        assert 0 <= duration["min"] <= duration["p50"] <= duration["p99"] <= duration["max"]

    async with async_client(api_server.url) as anonymous:
        probe = await anonymous.get("/healthz")
        assert probe.status_code == 200
        assert probe.json() == {"status": "ok"}


async def test_a_dead_letter_is_listed_and_replayed(
    api_server: ServerThread, make_bus_app: Callable[[], App], failing: set[str]
) -> None:
    topic = LANES["replay"]
    async with (
        async_client(api_server.url, ADMIN) as admin,
        async_client(api_server.url, PUBLISHER) as publisher,
        make_bus_app().running(),
    ):
        failing.add("replay")
        published = await publisher.post("/v1/events", json={"topic": topic, "payload": {"n": 3}})
        event_id = published.json()["event_id"]

        async def dead() -> list[dict[str, Any]]:
            return (await publisher.get(f"/v1/dlq/{topic}")).json()["dead_letters"]

        [letter] = await apoll(dead, message="the dead letter")
        assert letter["event_id"] == event_id
        assert letter["agent"] == "replay"
        assert letter["error_type"] == "RuntimeError"
        assert letter["error_message"] == "job 3 failed"
        assert letter["payload"] == {"n": 3}
        assert letter["attempts"] == 1
        assert "Traceback" in letter["traceback"]
        everywhere = (await publisher.get("/v1/dlq", params={"agent": "replay"})).json()
        assert [d["event_id"] for d in everywhere["dead_letters"]] == [event_id]

        # Replay needs the admin scope.
        body = {"agent": "replay", "event_ids": [event_id]}
        refused = await publisher.post(f"/v1/dlq/{topic}/replay", json=body)
        assert refused.status_code == 403
        assert refused.json()["code"] == "forbidden"

        dry = await admin.post(f"/v1/dlq/{topic}/replay", json={**body, "dry_run": True})
        assert dry.status_code == 200, dry.text
        assert dry.json() == {
            "topic": topic,
            "agent": "replay",
            "dry_run": True,
            "replayed": 0,
            "event_ids": [event_id],
            "missing": [],
            "undecodable": [],
        }
        assert len(await dead()) == 1

        missing = await admin.post(
            f"/v1/dlq/{topic}/replay", json={"agent": "replay", "event_ids": ["nope"]}
        )
        assert missing.status_code == 404

        failing.discard("replay")
        replayed = await admin.post(
            f"/v1/dlq/{topic}/replay", json={**body, "event_ids": [event_id, "gone"]}
        )
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["replayed"] == 1
        assert replayed.json()["event_ids"] == [event_id]
        assert replayed.json()["missing"] == ["gone"]

        async def succeeded() -> bool:
            answer = await admin.get(f"/v1/events/{event_id}/result")
            return answer.json()["results"][0]["status"] == "succeeded"

        await apoll(succeeded, message="the replayed event to succeed")
        assert await dead() == []


async def test_replay_and_purge_refusals(api_server: ServerThread) -> None:
    topic = LANES["purge"]
    async with async_client(api_server.url, ADMIN) as admin:
        no_agent = await admin.post(f"/v1/dlq/{topic}/replay", json={"agent": "x", "all": True})
        assert no_agent.status_code == 404
        neither = await admin.post(f"/v1/dlq/{topic}/replay", json={"agent": "purge"})
        assert neither.status_code == 422
        assert "name events with event_ids, or replay every one" in neither.json()["message"]
        both = await admin.post(
            f"/v1/dlq/{topic}/replay", json={"agent": "purge", "all": True, "event_ids": ["a"]}
        )
        assert both.status_code == 422
        bad_topic = await admin.get("/v1/dlq/Not.A.Topic")
        assert bad_topic.status_code == 422
        assert "invalid topic name 'Not.A.Topic'" in bad_topic.json()["message"]
        unknown = f"unknown.t{uuid.uuid4().hex[:8]}"
        for method, path in (("GET", f"/v1/topics/{unknown}"), ("DELETE", f"/v1/topics/{unknown}")):
            answer = await admin.request(method, path)
            assert answer.status_code == 404, (method, path)
            assert answer.json()["message"] == f"no topic {unknown!r} on the bus"


async def test_purge_dead_letters_then_the_topic(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    topic = LANES["purge"]
    async with async_client(api_server.url, PUBLISHER) as publisher, make_bus_app().running():
        for n in (1, 2):
            await publisher.post(
                "/v1/events", json={"topic": topic, "payload": {"n": n, "fail": True}}
            )

        async def dead() -> bool:
            return len((await publisher.get(f"/v1/dlq/{topic}")).json()["dead_letters"]) == 2

        await apoll(dead, message="two dead letters")

    async with async_client(api_server.url, PUBLISHER) as publisher:
        for path in (f"/v1/dlq/{topic}", f"/v1/topics/{topic}"):
            refused = await publisher.delete(path)
            assert refused.status_code == 403, path

    async with async_client(api_server.url, ADMIN) as admin:
        purged = await admin.delete(f"/v1/dlq/{topic}", params={"agent": "purge"})
        assert purged.status_code == 200, purged.text
        assert purged.json() == {"topic": topic, "agent": "purge", "removed": 2}
        assert (await admin.get(f"/v1/dlq/{topic}")).json()["dead_letters"] == []

        deleted = await admin.delete(f"/v1/topics/{topic}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"topic": topic, "entries": 2, "agents": ["purge"]}
        assert (await admin.get(f"/v1/topics/{topic}")).status_code == 404
