"""Runs over HTTP: `GET /v1/traces/{id}` and `GET /v1/runs`, against a real worker on Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from omnidaemon import App
from omnidaemon.traces import RunSummary, Trace
from tests.api._support import PUBLISHER, READER, ServerThread, apoll, async_client
from tests.api.conftest import LANES

pytestmark = pytest.mark.anyio


async def test_a_runs_trace_and_the_recent_runs(
    api_server: ServerThread, make_bus_app: Callable[[], App]
) -> None:
    topic = LANES["handled"]
    async with async_client(api_server.url, PUBLISHER) as http, make_bus_app().running():
        ids = []
        for job in ({"n": 1}, {"n": 2, "fail": True}):
            published = await http.post("/v1/events", json={"topic": topic, "payload": job})
            assert published.status_code == 202, published.text
            ids.append(published.json()["event_id"])

        async def ended(event_id: str) -> Trace | None:
            found = await http.get(f"/v1/traces/{event_id}")
            if found.status_code != 200:
                return None
            trace = Trace.model_validate(found.json())
            return trace if trace.status != "running" else None

        ok = await apoll(lambda: ended(ids[0]), message="the first run to end")
        failed = await apoll(lambda: ended(ids[1]), message="the second run to end")

    assert ok.status == "succeeded"
    assert failed.status == "failed"
    [event] = failed.events
    assert (event.id, event.topic) == (ids[1], topic)
    [handling] = event.handlings
    assert handling.agent == "handled"
    [attempt] = handling.attempts
    assert attempt.outcome == "dead_lettered"
    assert attempt.error == {"type": "RuntimeError", "message": "job 2 failed"}
    assert failed.failures[0]["agent"] == "handled"

    async with async_client(api_server.url, READER) as http:
        listed = await http.get("/v1/runs")
        only_failed = await http.get("/v1/runs", params={"status": "failed", "since": 600})
        one = await http.get("/v1/runs", params={"limit": 1})
        again = await http.get(f"/v1/traces/{ids[1]}")

    assert listed.status_code == 200, listed.text
    runs = [RunSummary.model_validate(r) for r in listed.json()]
    assert {r.run_id for r in runs} == set(ids)
    assert [r.run_id for r in (RunSummary.model_validate(r) for r in only_failed.json())] == [
        ids[1]
    ]
    assert only_failed.json()[0]["failed_agent"] == "handled"
    assert only_failed.json()[0]["error"]["message"] == "job 2 failed"
    assert len(one.json()) == 1
    assert Trace.model_validate(again.json()) == failed


async def test_unknown_ids_bad_queries_and_missing_tokens(api_server: ServerThread) -> None:
    unknown = str(uuid.uuid4())
    async with async_client(api_server.url, READER) as http:
        missing = await http.get(f"/v1/traces/{unknown}")
        bad_since = await http.get("/v1/runs", params={"since": 0})
        bad_status = await http.get("/v1/runs", params={"status": "exploded"})
    async with async_client(api_server.url) as anonymous:
        refused = [
            await anonymous.get(f"/v1/traces/{unknown}"),
            await anonymous.get("/v1/runs"),
        ]

    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    assert unknown in missing.json()["message"]
    assert bad_since.status_code == 422
    assert bad_since.json()["code"] == "invalid_request"
    assert bad_status.status_code == 422
    for answer in refused:
        assert answer.status_code == 401
        assert answer.json()["code"] == "unauthorized"
