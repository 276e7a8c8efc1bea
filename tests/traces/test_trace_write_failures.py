"""A trace write the bus refuses while it takes the acknowledgements (on a real Redis): the
events are settled and counted once, and the records go again with later batches until the
bus takes them."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import anyio
import pytest
import redis.asyncio as aioredis

from omnidaemon import App
from omnidaemon.brokers import RedisBroker
from omnidaemon.worker.runner import Worker

pytestmark = pytest.mark.anyio


async def test_a_refused_trace_write_settles_and_counts_once_then_goes_again(
    redis_url: str,
) -> None:
    prefix = f"tw{uuid4().hex[:8]}"
    app = App("tw", broker=RedisBroker(redis_url, prefix=prefix))
    topic = f"{prefix}.job"

    @app.agent(topic)
    async def job(event: dict[str, Any]) -> None: ...

    raw = aioredis.Redis.from_url(redis_url)
    async with app, anyio.create_task_group() as tg:
        run = await app.publish(topic, {"n": 1})
        # The list of the run's trace directories holds a string: the bus refuses the trace
        # script (WRONGTYPE).
        in_the_way = app.broker.trace_dirs_key(app.broker.trace_shard(run))  # type: ignore[attr-defined]
        await raw.set(in_the_way, b"in the way")
        worker = Worker(app)
        tg.start_soon(worker.run)
        with anyio.fail_after(15):
            while not (await app.broker.stats()).get((topic, "job"), {}).get("succeeded"):
                await anyio.sleep(0.02)
            [group] = await raw.xinfo_groups(app.broker.stream_key(topic))  # type: ignore[attr-defined]
            while group["pending"]:
                await anyio.sleep(0.02)
                [group] = await raw.xinfo_groups(app.broker.stream_key(topic))  # type: ignore[attr-defined]
        assert await raw.get(in_the_way) == b"in the way"
        await raw.delete(in_the_way)
        with anyio.fail_after(15):
            while (trace := await app.trace(run)) is None:
                await anyio.sleep(0.02)  # it goes again with the next batch (or the counts')
        assert [a.outcome for a in trace.events[0].handlings[0].attempts] == ["succeeded"]
        stats = (await app.broker.stats())[(topic, "job")]
        assert stats["succeeded"] == 1 and stats["received"] == 1  # counted once
        worker.stop()
        tg.cancel_scope.cancel()
    await raw.aclose()
