"""`GET /v1/events/{id}/stream`: a client reading Server-Sent Events (httpx, streaming) from
the HTTP API while a real worker (on Redis) streams; resumed with `Last-Event-ID`."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import orjson
import pytest

from omnidaemon import App, Context
from omnidaemon.api.routes import streams
from omnidaemon.brokers.redis import RedisBroker
from tests.api._support import (
    PUBLISHER,
    READER,
    ServerThread,
    apoll,
    async_client,
    running_api,
)
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

TOPIC = f"sse{uuid.uuid4().hex[:8]}.asked"


def make_app(broker: RedisBroker) -> App:
    app = App("sse", broker=broker)

    @app.agent(TOPIC, stream=str, max_retries=1, retry_backoff=0.01)
    async def chat(question: dict[str, Any], ctx: Context) -> str:
        words = [f"w{i}" for i in range(question.get("words", 4))]
        for i, word in enumerate(words):
            await ctx.emit(word)
            await anyio.sleep(question.get("pause", 0))
            if i == 1 and ctx.attempt <= question.get("fail", 0):
                raise RuntimeError(f"attempt {ctx.attempt} broke")
        return " ".join(words)

    return app


@pytest.fixture(scope="module")
def make_bus_app(redis_server: RedisServer) -> Callable[[], App]:
    prefix = f"sse{uuid.uuid4().hex[:8]}"
    return lambda: make_app(RedisBroker(redis_server.url, prefix=prefix))


@pytest.fixture(scope="module")
def api(make_bus_app: Callable[[], App]) -> Iterator[ServerThread]:
    with running_api(make_bus_app()) as server:
        yield server


async def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of an SSE response (`id`, `event`, `data` parsed), comments as
    `{"comment": ...}`."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if current:
                events.append(current)
                current = {}
        elif line.startswith(":"):
            events.append({"comment": line[1:].strip()})
        else:
            field, _, value = line.partition(": ")
            current[field] = orjson.loads(value) if field == "data" else value
    return events


async def test_a_client_reads_the_stream_live_and_resumes_after_an_id(
    api: ServerThread, make_bus_app: Callable[[], App], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT", 0.2)
    worker = make_bus_app()
    async with async_client(api.url, PUBLISHER) as http, worker.running():
        published = await http.post("/v1/events", json={"topic": TOPIC, "payload": {"pause": 0.3}})
        event_id = published.json()["event_id"]
        url = f"/v1/events/{event_id}/stream"
        async with http.stream("GET", url, params={"timeout": 10}) as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-store"
            events = await read_sse(response)
        frames = [e for e in events if "event" in e]
        assert [(e["event"], e["data"].get("data")) for e in frames] == [
            ("chunk", "w0"),
            ("chunk", "w1"),
            ("chunk", "w2"),
            ("chunk", "w3"),
            ("end", None),
        ]
        assert [e["data"]["index"] for e in frames[:4]] == [0, 1, 2, 3]
        assert frames[-1]["data"] == {
            "agent": "chat",
            "attempt": 1,
            "status": "succeeded",
            "result": "w0 w1 w2 w3",
        }
        assert {"comment": "keep-alive"} in events  # the handler pauses longer than 0.2 s
        ids = [e["id"] for e in frames]
        assert len(set(ids)) == 5

        # Reconnecting with Last-Event-ID resumes right after it; after the end: 204.
        async with async_client(api.url, READER) as reader:
            headers = {"Last-Event-ID": ids[1]}
            async with reader.stream("GET", url, headers=headers) as response:
                resumed = [e for e in await read_sse(response) if "event" in e]
            assert resumed == frames[2:]
            done = await reader.get(url, headers={"Last-Event-ID": ids[-1]})
            assert done.status_code == 204
            # An id the log does not hold (expired, another log's): from the start.
            headers = {"Last-Event-ID": "not-an-id"}
            async with reader.stream("GET", url, headers=headers) as response:
                again = [e for e in await read_sse(response) if "event" in e]
            assert again == frames


async def test_a_retry_is_a_restart_event_and_failures_end_the_stream(
    api: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    worker = make_bus_app()
    async with async_client(api.url, PUBLISHER) as http, worker.running():
        retried = await http.post(
            "/v1/events", json={"topic": TOPIC, "payload": {"words": 3, "fail": 1}}
        )
        failed = await http.post(
            "/v1/events", json={"topic": TOPIC, "payload": {"words": 3, "fail": 2}}
        )
        url = f"/v1/events/{retried.json()['event_id']}/stream"
        async with http.stream("GET", url, params={"timeout": 10}) as response:
            frames = [e for e in await read_sse(response) if "event" in e]
        assert [(e["event"], e["data"]["attempt"], e["data"].get("data")) for e in frames] == [
            ("chunk", 1, "w0"),
            ("chunk", 1, "w1"),
            ("restart", 1, None),
            ("chunk", 2, "w0"),
            ("chunk", 2, "w1"),
            ("chunk", 2, "w2"),
            ("end", 2, None),
        ]
        assert frames[2]["data"]["error"] == {"type": "RuntimeError", "message": "attempt 1 broke"}
        assert "id" in frames[2]  # a resume point: the retrying end's entry

        url = f"/v1/events/{failed.json()['event_id']}/stream"
        async with http.stream("GET", url, params={"timeout": 10}) as response:
            frames = [e for e in await read_sse(response) if "event" in e]
        assert frames[-1]["event"] == "end"
        assert frames[-1]["data"]["status"] == "dead_lettered"
        assert frames[-1]["data"]["error"]["message"] == "attempt 2 broke"


async def test_nothing_streamed_is_404_and_reading_needs_a_token(api: ServerThread) -> None:
    async with async_client(api.url, READER) as http:
        missing = await http.get(f"/v1/events/{uuid.uuid4()}/stream", params={"timeout": 0.2})
        assert missing.status_code == 404
        assert missing.json()["code"] == "not_found"
    async with async_client(api.url) as anonymous:
        refused = await anonymous.get(f"/v1/events/{uuid.uuid4()}/stream")
        assert refused.status_code == 401


async def test_open_streams_count_against_the_bound_on_waiting_requests(
    make_bus_app: Callable[[], App],
) -> None:
    with running_api(make_bus_app(), max_waiting=1) as server:
        async with async_client(server.url, READER) as http:
            answers: list[int] = []

            async def wait_for_nothing() -> None:
                got = await http.get(f"/v1/events/{uuid.uuid4()}/stream", params={"timeout": 1})
                answers.append(got.status_code)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait_for_nothing)
                waiting = server.server.config.app.state.omnidaemon.waiting

                async def holding() -> bool:  # the first request holds the only slot
                    return bool(waiting.waiting == 1)

                await apoll(holding, message="the first request to wait")
                busy = await http.get(f"/v1/events/{uuid.uuid4()}/stream")
                assert busy.status_code == 503
                assert busy.headers["retry-after"] == "1"
            assert answers == [404]
