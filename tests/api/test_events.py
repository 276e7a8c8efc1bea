"""Publishing, request-reply and results over HTTP, against a real worker on Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import orjson
import pytest

from omnidaemon import App, Context
from omnidaemon.brokers.redis import RedisBroker
from tests.api._support import ADMIN, PUBLISHER, READER, Job, ServerThread, apoll, async_client
from tests.api.conftest import LANES
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


async def test_publish_is_handled_and_its_result_read_by_id(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    topic = LANES["handled"]
    async with async_client(api_server.url, PUBLISHER) as http, make_bus_app().running():
        published = await http.post("/v1/events", json={"topic": topic, "payload": {"n": 21}})
        assert published.status_code == 202, published.text
        event_id = published.json()["event_id"]
        assert published.json() == {"event_id": event_id, "topic": topic}
        assert published.headers["location"] == f"/v1/events/{event_id}/result"

        waited = await http.get(published.headers["location"], params={"wait": 10})
        assert waited.status_code == 200, waited.text
        [result] = waited.json()["results"]
        assert result["agent"] == "handled"
        assert result["status"] == "succeeded"
        assert result["result"] == {"doubled": 42}
        assert result["attempts"] == 1

    async with async_client(api_server.url, READER) as http:
        # Read at once (no wait), and for one agent by name.
        now = await http.get(f"/v1/events/{event_id}/result", params={"agent": "handled"})
        assert now.status_code == 200
        assert now.json()["results"][0]["result"] == {"doubled": 42}

        other = await http.get(f"/v1/events/{event_id}/result", params={"agent": "nobody"})
        assert other.status_code == 404
        assert "agent 'nobody' stored no result" in other.json()["message"]


async def test_unknown_event_id_is_404(api_server: ServerThread) -> None:
    unknown = str(uuid.uuid4())
    async with async_client(api_server.url, READER) as http:
        found = await http.get(f"/v1/events/{unknown}/result")
        assert found.status_code == 404
        assert found.json()["code"] == "not_found"
        assert unknown in found.json()["message"]

        waited = await http.get(f"/v1/events/{unknown}/result", params={"wait": 0.2})
        assert waited.status_code == 504
        assert waited.json()["code"] == "timeout"


async def test_publish_carries_every_option_in_the_envelope(api_server: ServerThread) -> None:
    topic = f"loose.t{uuid.uuid4().hex[:8]}"  # no agent reads it: the entry stays as sent
    async with async_client(api_server.url, PUBLISHER) as http:
        published = await http.post(
            "/v1/events",
            json={
                "topic": topic,
                "payload": {"text": "hello", "n": [1, 2]},
                "correlation_id": "order-7",
                "reply_to": "answers.here",
                "webhook": "https://hooks.example.com/done",
                "tenant_id": "acme",
                "headers": {"x-trace": "abc"},
            },
        )
        assert published.status_code == 202, published.text
        event_id = published.json()["event_id"]
        delayed = await http.post(
            "/v1/events", json={"topic": topic, "payload": {"later": True}, "delay": 600}
        )
        assert delayed.status_code == 202, delayed.text

        described = await http.get(f"/v1/topics/{topic}")
        assert described.status_code == 200
        held = described.json()
        assert held.pop("delayed_bytes") > 0
        assert held == {"topic": topic, "length": 1, "delayed": 1, "groups": []}
        entries = (await http.get(f"/v1/topics/{topic}/entries")).json()
    [entry] = entries["entries"]
    assert entries["topic"] == topic
    assert entry["id"] == event_id
    assert entry["payload"] == {"text": "hello", "n": [1, 2]}
    assert entry["correlation_id"] == "order-7"
    assert entry["reply_to"] == "answers.here"
    assert entry["webhook"] == "https://hooks.example.com/done"
    assert entry["tenant_id"] == "acme"
    assert entry["headers"]["x-trace"] == "abc"
    assert entry["source"] == "apitest"


async def test_reply_to_sends_the_result_to_that_topic(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    replies = f"replies.t{uuid.uuid4().hex[:8]}"
    async with async_client(api_server.url, ADMIN) as http, make_bus_app().running():
        published = await http.post(
            "/v1/events",
            json={"topic": LANES["options"], "payload": {"n": 4}, "reply_to": replies},
        )
        event_id = published.json()["event_id"]

        async def reply() -> list[dict[str, object]]:
            found = await http.get(f"/v1/topics/{replies}/entries")
            return found.json()["entries"] if found.status_code == 200 else []

        [entry] = await apoll(reply, message="the reply")
    assert entry["payload"] == {"doubled": 8}
    assert entry["causation_id"] == event_id


async def test_request_waits_for_the_reply(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    topic = LANES["request"]
    async with async_client(api_server.url, PUBLISHER) as http, make_bus_app().running():
        answered = await http.post("/v1/requests", json={"topic": topic, "payload": {"n": 5}})
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"topic": topic, "reply": {"doubled": 10}}

        failed = await http.post(
            "/v1/requests", json={"topic": topic, "payload": {"n": 1, "fail": True}}
        )
        assert failed.status_code == 502
        assert failed.json()["code"] == "agent_failed"
        assert "RuntimeError: job 1 failed" in failed.json()["message"]

        unread = f"nobody.t{uuid.uuid4().hex[:8]}"
        timed_out = await http.post(
            "/v1/requests", json={"topic": unread, "payload": {}, "timeout": 0.2}
        )
        assert timed_out.status_code == 504
        assert timed_out.json()["code"] == "timeout"


async def test_a_payload_that_contradicts_the_agents_type_is_refused(
    api_server: ServerThread,
) -> None:
    async with async_client(api_server.url, PUBLISHER) as http:
        refused = await http.post(
            "/v1/events", json={"topic": LANES["handled"], "payload": {"n": "many"}}
        )
    assert refused.status_code == 422
    assert refused.json()["code"] == "invalid_payload"
    assert "not a valid Job" in refused.json()["message"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"topic": "a.b", "payload": ', 400, "not valid JSON"),
        (b'{"topic": "Bad Topic", "payload": 1}', 422, "invalid topic name 'Bad Topic'"),
        (b'{"payload": 1}', 422, "body.topic: Field required"),
        (b'{"topic": "a.b"}', 422, "body.payload: Field required"),
        (b'{"topic": "a.b", "payload": 1, "delai": 5}', 422, "body.delai: Extra inputs"),
        (b'{"topic": "a.b", "payload": 1, "delay": -1}', 422, "body.delay"),
        (b"[1, 2]", 422, "body"),
    ],
)
async def test_bad_publish_bodies_are_4xx_with_a_clear_message(
    api_server: ServerThread, body: bytes, status: int, fragment: str
) -> None:
    async with async_client(api_server.url, PUBLISHER) as http:
        answer = await http.post(
            "/v1/events", content=body, headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == status, answer.text
    assert fragment in answer.json()["message"]
    assert "Traceback" not in answer.text


async def test_a_body_not_sent_as_json_is_415(api_server: ServerThread) -> None:
    body = orjson.dumps({"topic": "a.b", "payload": 1})
    async with async_client(api_server.url, PUBLISHER) as http:
        for headers in ({}, {"Content-Type": "text/plain"}):
            answer = await http.post("/v1/events", content=body, headers=headers)
            assert answer.status_code == 415, answer.text
            assert "Content-Type: application/json" in answer.json()["message"]


async def test_a_body_over_the_limit_is_413(api_server: ServerThread) -> None:
    payload = {"topic": "a.b", "payload": "x" * (3 * 1024 * 1024)}
    async with async_client(api_server.url, PUBLISHER) as http:
        declared = await http.post("/v1/events", json=payload)
        assert declared.status_code == 413
        assert declared.json()["code"] == "payload_too_large"

        async def chunks() -> httpx.AsyncByteStream:  # type: ignore[misc]
            yield orjson.dumps(payload)  # no Content-Length: sent chunked

        streamed = await http.post(
            "/v1/events", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413


async def test_an_event_over_max_payload_bytes_is_413(api_server: ServerThread) -> None:
    payload = {"topic": "a.b", "payload": "x" * (1024 * 1024 + 10)}  # under the body limit
    async with async_client(api_server.url, PUBLISHER) as http:
        answer = await http.post("/v1/events", json=payload)
    assert answer.status_code == 413
    assert "max_payload_bytes" in answer.json()["message"]


async def test_request_dead_lettered_for_its_payload_is_502_at_once(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    # The worker's app declares the type; the API's app does not know the topic, so the
    # invalid payload is sent and dead-lettered by the worker without running the handler.
    topic = f"typed.t{uuid.uuid4().hex[:8]}"
    worker = App("typedworker", broker=RedisBroker(redis_server.url, prefix=bus_prefix))

    @worker.agent(topic, name="typed", max_retries=3)
    async def typed(job: Job) -> dict[str, int]:
        return {"doubled": job.n * 2}

    async with async_client(api_server.url, PUBLISHER) as http, worker.running():
        started = time.monotonic()
        failed = await http.post(
            "/v1/requests", json={"topic": topic, "payload": {"n": "many"}, "timeout": 60}
        )
        elapsed = time.monotonic() - started
    assert failed.status_code == 502, failed.text
    assert failed.json()["code"] == "agent_failed"
    assert "PayloadValidationError" in failed.json()["message"]
    assert elapsed < 10  # the dead letter answered, not the 60 s timeout


async def test_the_result_of_a_pipelines_first_event_leads_to_the_next(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    stage1, stage2 = f"stage1.t{uuid.uuid4().hex[:8]}", f"stage2.t{uuid.uuid4().hex[:8]}"
    worker = App("pipeline", broker=RedisBroker(redis_server.url, prefix=bus_prefix))

    @worker.agent(stage1, name="extract", publishes=stage2)
    async def extract(job: Job) -> Job:
        return Job(n=job.n + 1)

    @worker.agent(stage2, name="summarise", store_results=True)
    async def summarise(job: Job) -> dict[str, int]:
        return {"summary": job.n * 10}

    async with async_client(api_server.url, ADMIN) as http, worker.running():
        published = await http.post("/v1/events", json={"topic": stage1, "payload": {"n": 4}})
        location = published.headers["location"]

        async def followed() -> dict[str, object] | None:
            found = await http.get(location)
            # Outputs are published before the event's acknowledgement (which is batched):
            # for a moment the child exists while the first stage still holds the event.
            body = found.json() if found.status_code == 200 else {}
            settled = all(a["state"] == "handled" for a in body.get("agents") or [{}])
            return body if body.get("published") and settled else None

        body = await apoll(followed, message="the first stage's child")
        waited = await http.get(location, params={"wait": 0.3})  # was a 504
        [child] = body["published"]
        last = await http.get(f"/v1/events/{child['event_id']}/result", params={"wait": 10})
    assert body["topic"] == stage1
    assert body["results"] == [{**body["results"][0], "status": "pending"}]
    assert body["agents"] == [{"agent": "extract", "state": "handled", "result": None}]
    assert child["topic"] == stage2
    assert waited.status_code == 200, waited.text
    assert waited.json()["published"] == [child]
    assert last.json()["results"][0]["result"] == {"summary": 50}


async def test_an_admin_cancels_an_event_and_a_waiting_request_is_told_409(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    import anyio

    topic = f"slow.t{uuid.uuid4().hex[:8]}"
    worker = App("slowworker", broker=RedisBroker(redis_server.url, prefix=bus_prefix))
    started = anyio.Event()
    running: list[str] = []

    @worker.agent(topic, name="slowly", store_results=True)
    async def slowly(job: Job, ctx: Context) -> dict[str, int]:
        running.append(ctx.event_id)
        started.set()
        await anyio.sleep(60)
        return {"n": job.n}

    answers: list[httpx.Response] = []
    async with worker.running(), async_client(api_server.url, ADMIN) as http:

        async def ask() -> None:
            answers.append(
                await http.post(
                    "/v1/requests", json={"topic": topic, "payload": {"n": 1}, "timeout": 60}
                )
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(10):
                await started.wait()
            [event_id] = running
            async with async_client(api_server.url, READER) as reader:
                refused = await reader.delete(f"/v1/events/{event_id}")
                assert refused.status_code == 403
            cancelled = await http.delete(
                f"/v1/events/{event_id}", params={"reason": "took too long"}
            )
            assert cancelled.status_code == 200, cancelled.text
            body = cancelled.json()
            assert body["kind"] == "event" and body["target"] == event_id
            assert body["reason"] == "took too long" and body["agents"] is None
        run = await http.delete("/v1/runs/some-run", params={"reason": "abandoned"})
        assert run.status_code == 200 and run.json()["kind"] == "run"
    [answer] = answers
    assert answer.status_code == 409, answer.text
    assert answer.json()["code"] == "cancelled"
    assert "took too long" in answer.json()["message"]
