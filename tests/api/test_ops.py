"""Operator routes of issue 16 over HTTP, against a real worker on Redis: what each worker
runs now (`/v1/inspect`), and the agents as `omnidaemon agents --json` shows them."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from pydantic import BaseModel, TypeAdapter

from omnidaemon import App
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.settings import Settings
from omnidaemon.topology import describe_agent
from tests.api._support import PUBLISHER, READER, ServerThread, apoll, async_client, running_api
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

TOPIC = f"crawl.t{uuid.uuid4().hex[:8]}"


class Page(BaseModel):
    """A page to crawl."""

    url: str
    depth: int = 0


class Crawled(BaseModel):
    url: str
    links: list[str]


def make_ops_app(redis_url: str, prefix: str, gate: anyio.Event | None = None) -> App:
    """An app whose `crawler` runs until `gate` is set, publishing to `<TOPIC>.done`."""
    settings = dataclasses.replace(Settings.from_env(), heartbeat_interval=0.2)
    app = App("opsapp", broker=RedisBroker(redis_url, prefix=prefix), settings=settings)

    @app.agent(TOPIC, name="crawler", publishes=f"{TOPIC}.done", concurrency=4)
    async def crawl(page: Page) -> Crawled:
        if gate is not None:
            await gate.wait()
        return Crawled(url=page.url, links=[])

    @app.agent(f"{TOPIC}.done", name="indexer")
    async def index(crawled: Crawled) -> None:
        """Indexes what was crawled."""

    return app


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"ops{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ops_api(redis_server: RedisServer, prefix: str) -> Iterator[ServerThread]:
    with running_api(make_ops_app(redis_server.url, prefix)) as server:
        yield server


async def test_inspect_lists_what_the_worker_runs_now(
    ops_api: ServerThread, redis_server: RedisServer, prefix: str
) -> None:
    gate = anyio.Event()
    worker_app = make_ops_app(redis_server.url, prefix, gate)
    async with (
        async_client(ops_api.url, READER) as reader,
        async_client(ops_api.url, PUBLISHER) as publisher,
        worker_app.running(),
    ):
        published = await publisher.post(
            "/v1/events", json={"topic": TOPIC, "payload": {"url": "https://a.example"}}
        )
        assert published.status_code == 202, published.text
        event_id = published.json()["event_id"]

        async def running() -> dict[str, Any] | None:
            answer = await reader.get("/v1/inspect", params={"payload": "true"})
            assert answer.status_code == 200, answer.text
            workers = answer.json()["workers"]
            return workers[0] if workers and workers[0]["count"] == 1 else None

        worker = await apoll(running, message="the event to show as running")
        assert worker["app"] == "opsapp"
        [event] = worker["running"]
        assert (event["event_id"], event["agent"], event["topic"]) == (event_id, "crawler", TOPIC)
        assert event["attempt"] == 1
        assert (event["payload"], event["payload_listed"]) == ({"url": "https://a.example"}, True)
        other = (await reader.get("/v1/inspect", params={"agent": "indexer"})).json()
        assert [w["running"] for w in other["workers"]] == [[]]
        plain = (await reader.get("/v1/inspect")).json()["workers"][0]["running"][0]
        assert "payload" not in plain or plain["payload"] is None

        gate.set()

        async def finished() -> bool:
            workers = (await reader.get("/v1/inspect")).json()["workers"]
            return bool(workers) and workers[0]["count"] == 0

        await apoll(finished, message="the event to finish")


async def test_agents_carry_their_schemas_and_agree_with_the_cli(ops_api: ServerThread) -> None:
    async with async_client(ops_api.url, READER) as reader:
        body = (await reader.get("/v1/agents")).json()
    crawler = next(a for a in body["agents"] if a["name"] == "crawler")
    # What `omnidaemon agents --json` prints for the same agent (`describe_agent`).
    assert crawler == describe_agent(make_ops_app("redis://x", "x").agents["crawler"])
    assert crawler["backoff"]["jitter"] is True  # not 1.0
    assert crawler["payload_schema"] == TypeAdapter(Page).json_schema()
    assert crawler["payload_schema"]["required"] == ["url"]
    assert crawler["return_schema"]["title"] == "Crawled"


async def test_asyncapi_document_is_served(ops_api: ServerThread) -> None:
    async with async_client(ops_api.url, READER) as reader:
        answer = await reader.get("/asyncapi.json")
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "opsapp"
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {TOPIC, f"{TOPIC}.done"}
    assert sorted(op["action"] for op in document["operations"].values()) == [
        "receive",
        "receive",
        "send",
    ]
    assert sorted(document["components"]["schemas"]) == ["Crawled", "Page"]
