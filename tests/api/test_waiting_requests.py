"""Requests that wait: abandoned ones give back what they hold, and a bound answers 503 with
`Retry-After` instead of letting a burst take every connection to the bus (issue 15, item 2)."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from omnidaemon import App
from omnidaemon.brokers.redis import RedisBroker
from tests.api._support import ADMIN, apoll, async_client, make_app, running_api
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio

POOL = 24  # the API's connections to the bus: small, so that a leak shows at once
MAX_WAITING = 8


def _app(redis_server: RedisServer, prefix: str, topic: str) -> App:
    broker = RedisBroker(redis_server.url, prefix=prefix, max_connections=POOL)
    return make_app(broker, {"answer": topic}, set())


async def _abandon(http: httpx.AsyncClient, topic: str) -> str:
    """A request that would wait 60 s, given up by its client after 0.3 s."""
    try:
        answer = await http.post(
            "/v1/requests", json={"topic": topic, "payload": {"n": 1}, "timeout": 60}, timeout=0.3
        )
    except httpx.TimeoutException:
        return "abandoned"
    assert answer.status_code == 503, answer.text  # refused at once: the bound was reached
    assert answer.headers["Retry-After"] == "1"
    return "refused"


async def test_abandoned_requests_free_their_connections_and_the_api_recovers(
    redis_server: RedisServer,
) -> None:
    prefix = f"wait{uuid.uuid4().hex[:8]}"
    silent = f"silent.t{uuid.uuid4().hex[:8]}"  # no agent: its requests wait until abandoned
    answered = f"answered.t{uuid.uuid4().hex[:8]}"
    with running_api(_app(redis_server, prefix, answered), max_waiting=MAX_WAITING) as api:
        limits = httpx.Limits(max_connections=100)
        async with (
            async_client(api.url, ADMIN) as http,
            httpx.AsyncClient(base_url=api.url, headers=http.headers, limits=limits) as burst,
        ):
            outcomes: list[str] = []
            for _ in range(5):  # 200 requests, 40 at once, every one given up by its client

                async def one() -> None:
                    outcomes.append(await _abandon(burst, silent))

                async with anyio.create_task_group() as group:
                    for _ in range(40):
                        group.start_soon(one)
            assert len(outcomes) == 200
            assert outcomes.count("abandoned") >= MAX_WAITING

            # Each abandoned request ended when its client left, not after its 60 s: its
            # reply topic is deleted, and its connection back in the pool.
            await apoll(
                lambda: _reply_topics(redis_server, prefix, at_most=0),
                timeout=5,
                message="the reply topics to be deleted",
            )

            assert (await http.get("/healthz")).status_code == 200
            stats = await http.get("/v1/stats")
            assert stats.status_code == 200, stats.text

            # Normal answers, as many at once as the bound allows, from a real worker.
            async with _app(redis_server, prefix, answered).running():
                replies: list[httpx.Response] = []

                async def ask(n: int) -> None:
                    replies.append(
                        await burst.post(
                            "/v1/requests",
                            json={"topic": answered, "payload": {"n": n}, "timeout": 10},
                        )
                    )

                async with anyio.create_task_group() as group:
                    for n in range(MAX_WAITING):
                        group.start_soon(ask, n)
            assert [r.status_code for r in replies] == [200] * MAX_WAITING, [
                r.text for r in replies if r.status_code != 200
            ]
            assert sorted(r.json()["reply"]["doubled"] for r in replies) == [
                2 * n for n in range(MAX_WAITING)
            ]


async def test_past_the_bound_a_waiting_request_is_503_at_once(redis_server: RedisServer) -> None:
    prefix = f"wait{uuid.uuid4().hex[:8]}"
    silent = f"silent.t{uuid.uuid4().hex[:8]}"
    with running_api(_app(redis_server, prefix, silent), max_waiting=2) as api:
        async with async_client(api.url, ADMIN) as http:
            statuses: list[int] = []

            async def wait_once() -> None:
                answer = await http.post(
                    "/v1/requests", json={"topic": silent, "payload": {"n": 1}, "timeout": 1}
                )
                statuses.append(answer.status_code)

            async with anyio.create_task_group() as group:
                group.start_soon(wait_once)
                group.start_soon(wait_once)
                # Both wait; a third request, and a result read with `wait`, are refused.
                await apoll(
                    lambda: _reply_topics(redis_server, prefix, at_least=2),
                    message="two waiting requests",
                )
                third = await http.post(
                    "/v1/requests", json={"topic": silent, "payload": {"n": 1}, "timeout": 1}
                )
                assert third.status_code == 503
                assert third.json()["code"] == "busy"
                assert third.headers["Retry-After"] == "1"
                result = await http.get("/v1/events/some-id/result", params={"wait": 1})
                assert result.status_code == 503
                # A result read without `wait` does not wait, and is not bounded.
                assert (await http.get("/v1/events/some-id/result")).status_code == 404
            assert statuses == [504, 504]  # the two that waited timed out normally
            assert await _reply_topics(redis_server, prefix, at_most=0)


async def _reply_topics(
    redis_server: RedisServer, prefix: str, *, at_least: int = 0, at_most: int | None = None
) -> bool:
    """Whether the number of request-reply topics on the bus is within the bounds."""
    async with aioredis.Redis.from_url(redis_server.url) as redis:
        count = len([k async for k in redis.scan_iter(match=f"{prefix}:{{omni-reply.*")])
    return count >= at_least and (at_most is None or count <= at_most)
