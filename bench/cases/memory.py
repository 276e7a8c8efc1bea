"""Memory: the resident set of a worker process holding many events in its agent's scheduled
retries (every handler call raises `Retry(delay=3600)`, see omnidaemon/retry.py), read from
/proc/<pid>/status once they are all scheduled, next to the same worker's RSS when idle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.apps import build_app
from bench.cases.omni import TOPIC, WorkerRun, groups_done, stream_key
from bench.common import BenchError, Children, Config, RedisServer, make_event


def memory(server: RedisServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """RSS of an idle worker, then of the same worker once `memory_events` events wait in its
    agent's scheduled retries (its handler raises `Retry(delay=3600)`)."""
    m = cfg.memory_events
    due_key = f"omni:{{{TOPIC}}}:due:parked"
    with server.client() as r:
        r.flushall()
        worker = WorkerRun(children, server, "retry", out)
        worker.wait_ready()
        worker.wait(
            lambda: groups_done(r, stream_key(), ["parked"], 0),
            timeout=30,
            what="the worker to subscribe",
        )
        time.sleep(1.0)
        idle = worker.rss_mb()
        asyncio.run(_publish_parked(server.url, m, cfg.batch))
        worker.wait(
            lambda: r.zcard(due_key) >= m and groups_done(r, stream_key(), ["parked"], m),
            timeout=60 + m / 200,
            what=f"{m} events to be scheduled for retry",
        )
        time.sleep(1.0)
        loaded = worker.rss_mb()
        scheduled = int(r.zcard(due_key))
    worker.stop()
    if scheduled != m:
        raise BenchError(f"{scheduled} retries scheduled, not {m}")
    return {"memory.rss_idle": idle, "memory.rss": loaded}


async def _publish_parked(url: str, n: int, batch: int) -> None:
    app = build_app("retry", topic=TOPIC, broker=url)
    async with app:
        for i in range(0, n, batch):
            await app.publish_many([(TOPIC, make_event(j)) for j in range(i, min(n, i + batch))])
