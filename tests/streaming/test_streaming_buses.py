"""Streamed output on the real buses (Redis, Redis Cluster, NATS JetStream), with a worker in
process: a live reader and a late one get every chunk in order, a reader resumes after a
chunk, and a retry restarts the stream without mixing its attempts."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

from omnidaemon import App, Context, StreamChunk
from omnidaemon.brokers import Broker, RedisBroker, open_broker

pytestmark = pytest.mark.anyio

BUSES = {
    "redis": lambda request: RedisBroker(request.getfixturevalue("redis_url")),
    "cluster": lambda request: RedisBroker(request.getfixturevalue("cluster_url")),
    "nats": lambda request: open_broker(request.getfixturevalue("nats_url")),
}


@pytest.mark.parametrize("bus", sorted(BUSES))
async def test_streams_on_a_real_bus(request: pytest.FixtureRequest, bus: str) -> None:
    broker: Broker = BUSES[bus](request)
    topic = f"chat{uuid.uuid4().hex[:10]}.asked"
    app = App("streams", broker=broker)
    release = anyio.Event()

    @app.agent(topic, stream=str, max_retries=1, retry_backoff=0.01)
    async def chat(question: dict[str, Any], ctx: Context) -> str:
        words = [f"w{i} " for i in range(question["words"])]
        for i, word in enumerate(words):
            await ctx.emit(word)
            if i == 1 and question.get("wait"):
                await release.wait()  # a reader is reading while the stream is written
            if i == 1 and question.get("fail") and ctx.attempt == 1:
                raise RuntimeError("first attempt broke")
        return "".join(words)

    async with app, app.running():
        live_id = await app.publish(topic, {"words": 8, "wait": True})
        live: list[StreamChunk[Any]] = []
        with anyio.fail_after(20):
            async for chunk in app.stream(live_id, timeout=10):
                live.append(chunk)
                if len(live) == 2:
                    release.set()
        assert [c.data for c in live] == [f"w{i} " for i in range(8)]

        late = app.stream(live_id, timeout=5)
        assert [c async for c in late] == live
        assert late.result == "".join(f"w{i} " for i in range(8))
        assert [c async for c in app.stream(live_id, after=live[4].id, timeout=5)] == live[5:]

        retried = await app.publish(topic, {"words": 4, "fail": True})
        stream = app.stream(retried, timeout=10)
        with anyio.fail_after(20):
            got = [(c.attempt, c.data, c.restarted) async for c in stream]
        assert got == [
            (1, "w0 ", False),
            (1, "w1 ", False),
            (2, "w0 ", True),
            (2, "w1 ", False),
            (2, "w2 ", False),
            (2, "w3 ", False),
        ]
        assert (stream.restarts, stream.result) == (1, "w0 w1 w2 w3 ")
