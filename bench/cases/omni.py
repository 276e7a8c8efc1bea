"""omnidaemon: publishing from the benchmark's process, and workers as separate processes.

Drains are timed inside the worker, from its first handled event to the last one (the
`Recorder` of `bench.apps`, written to a file when the worker stops), and start only once the
worker waits for events (see `drain`); so neither the worker's start-up (imports, connecting,
creating groups) nor its shutdown is counted. The benchmark meanwhile polls XINFO GROUPS until
every group has read all N entries with none pending, and then stops the worker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis

from bench.apps import build_app
from bench.common import (
    ROOT,
    BenchError,
    Children,
    Config,
    LocalCluster,
    NatsServer,
    RedisServer,
    blocked_readers,
    make_event,
    progress,
    release,
    wait_until,
)
from bench.peers._shared import BenchEvent, paced
from omnidaemon import App
from omnidaemon.brokers import open_broker
from omnidaemon.settings import Settings

TOPIC = "bench.events"


def stream_key(topic: str = TOPIC) -> str:
    """The topic's stream, as omnidaemon lays it out on Redis (docs/brokers.md)."""
    return f"omni:{{{topic}}}:stream"


# Publishing -----------------------------------------------------------------------------------


async def _publish_rates(url: str, events: list[BenchEvent], batch: int) -> dict[str, float]:
    # The app the workers run: publishing checks payloads against its agents' declared type.
    app = build_app("drain", topic=TOPIC, broker=url)
    async with app:
        # Warm-up (not timed): connected, the code paths hot.
        await app.publish_many([(TOPIC, event) for event in events[:batch]])
        for event in events[:100]:
            await app.publish(TOPIC, event)

        start = time.perf_counter()
        for i in range(0, len(events), batch):
            await app.publish_many([(TOPIC, event) for event in events[i : i + batch]])
        many = len(events) / (time.perf_counter() - start)

        start = time.perf_counter()
        for event in events:
            await app.publish(TOPIC, event)
        awaited = len(events) / (time.perf_counter() - start)
    return {"omni.publish_many": many, "omni.publish": awaited}


def publish(server: RedisServer, cfg: Config) -> dict[str, float]:
    with server.client() as r:
        r.flushall()
    events = [make_event(i) for i in range(cfg.n)]
    return asyncio.run(_publish_rates(server.url, events, cfg.batch))


def _publisher(url: str, backlog: int) -> App:
    """The drain's publishing app, its topic keeping at least `backlog` events: with the
    default cap (`OMNIDAEMON_STREAM_MAXLEN`, 100,000) a larger pre-filled backlog would be
    trimmed before the worker read it, and the drain would never end."""
    maxlen = max(backlog + 1, Settings.from_env().stream_maxlen)
    return build_app("drain", topic=TOPIC, broker=open_broker(url, maxlen=maxlen))


async def _prefill(url: str, n: int, batch: int) -> None:
    app = _publisher(url, n)
    async with app:
        for i in range(0, n, batch):
            await app.publish_many([(TOPIC, make_event(j)) for j in range(i, min(n, i + batch))])


# Workers --------------------------------------------------------------------------------------


class WorkerRun:
    """`python -m omnidaemon worker bench.apps:<kind>` against the benchmark's server (or
    cluster, or nats-server: anything with a broker `url`); `env` adds to the worker's
    environment; `root` is the checkout whose code it runs (default: this one)."""

    def __init__(
        self,
        children: Children,
        server: RedisServer | LocalCluster | NatsServer,
        kind: str,
        out: Path,
        *,
        fanout: int = 1,
        processes: int = 1,
        expect: int | None = None,
        concurrency: int | None = None,
        env: Mapping[str, str] | None = None,
        root: Path = ROOT,
    ) -> None:
        for old in [*out.glob("ready-*"), *out.glob("stats-*.json")]:
            old.unlink()
        self.out = out
        self.log = out / f"worker-{kind}.log"
        argv = [
            sys.executable, "-m", "omnidaemon", "worker", f"bench.apps:{kind}",
            "--log-level", "WARNING", "--shutdown-grace", "10",
        ]  # fmt: skip
        if processes > 1:
            argv += ["--processes", str(processes)]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        environment = {
            "OMNIDAEMON_BROKER_URL": server.url,
            "OMNI_BENCH_TOPIC": TOPIC,
            "OMNI_BENCH_FANOUT": str(fanout),
            "OMNI_BENCH_OUT": str(out),
            "OMNI_BENCH_EXPECT": str(expect or ""),
            **(env or {}),
        }
        self.proc = children.start(argv, env=environment, log=self.log, cwd=root)

    def check(self) -> None:
        """`BenchError` with the end of the worker's log if it exited."""
        if self.proc.poll() is not None:
            log = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"the worker exited with status {self.proc.returncode}:\n{log}")

    def wait_ready(self, processes: int = 1) -> None:
        def ready() -> bool:
            self.check()
            return len(list(self.out.glob("ready-*"))) >= processes

        wait_until(ready, timeout=60, what="the worker to start")

    def wait(self, done: Callable[[], object], *, timeout: float, what: str) -> None:
        def check() -> bool:
            self.check()
            return bool(done())

        wait_until(check, timeout=timeout, what=what, interval=0.01)

    def stop(self) -> list[dict[str, Any]]:
        """Stop the worker gracefully; return what each of its processes recorded."""
        status = Children.stop(self.proc)
        stats = [json.loads(p.read_text()) for p in sorted(self.out.glob("stats-*.json"))]
        if status != 0 or not stats:
            log = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"the worker exited with status {status}, stats {len(stats)}:\n{log}")
        return stats

    def rss_mb(self) -> float:
        """The worker process's resident set (single-process workers)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchError("no VmRSS in /proc/<pid>/status")


def groups_done(r: redis.Redis, stream: str, groups: list[str], n: int) -> bool:
    """True once every group has read at least `n` entries of `stream` and acked them all."""
    try:
        infos = {g["name"]: g for g in r.xinfo_groups(stream)}
    except redis.ResponseError:
        return False
    for group in groups:
        info = infos.get(group)
        if info is None or info["pending"]:
            return False
        read = info.get("entries-read")
        if (read is None and info.get("lag") != 0) or (read is not None and read < n):
            return False
    return True


def drain(
    server: RedisServer,
    children: Children,
    cfg: Config,
    out: Path,
    *,
    n: int,
    fanout: int = 1,
    processes: int = 1,
    concurrency: int | None = None,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], None] | None = None,
    root: Path = ROOT,
) -> dict[str, float]:
    """Time a worker (`processes` processes, `fanout` agents on the topic, each handling every
    event) draining N pre-filled events, from its first handled event to its last. Returns
    events/s and, for one process, its CPU seconds per event over that window.

    The worker starts with nothing to read: N-1 events are pre-filled and its groups created
    at the stream's end. Once all its processes wait in XREADGROUP, the groups are moved back
    to the stream's start and the N-th event is published, which wakes them all at once; so
    neither start-up nor processes starting at different times are counted. `concurrency`
    is passed to the worker as `--concurrency` (default: the agents' own, 16); `env` adds to
    the worker's environment (`OMNI_BENCH_RATE_LIMIT`, say); `setup` runs once the bus is
    filled, before the worker starts; `root` is the checkout whose worker runs (`bench.ab`).
    """
    groups = [f"sink_{i}" for i in range(fanout)]
    with server.client() as r:
        r.flushall()
        asyncio.run(_prefill(server.url, n - 1, cfg.batch))
        for group in groups:
            r.xgroup_create(stream_key(), group, id="$", mkstream=True)
        if setup is not None:
            setup()
        worker = WorkerRun(
            children,
            server,
            "drain",
            out,
            fanout=fanout,
            processes=processes,
            expect=n * fanout if processes == 1 else None,
            concurrency=concurrency,
            env=env,
            root=root,
        )
        worker.wait(
            lambda: blocked_readers(r) >= processes * fanout,
            timeout=60,
            what="the worker to start and wait for events",
        )
        release(r, stream_key(), groups)
        asyncio.run(_publish_one(server.url, n - 1))
        worker.wait(
            lambda: groups_done(r, stream_key(), groups, n),
            timeout=60 + n * fanout / 500,
            what=f"the worker to drain {n} events into {fanout} agent(s)",
        )
    stats = worker.stop()
    handled = sum(s["count"] for s in stats)
    if handled != n * fanout:
        raise BenchError(f"the worker handled {handled} events, not {n * fanout}")
    busy = [s for s in stats if s["count"]]
    elapsed = max(s["last"] for s in busy) - min(s["first"] for s in busy)
    result = {"rate": n / elapsed}
    if processes == 1 and busy[0]["cpu"] is not None:
        result["cpu"] = busy[0]["cpu"] / n
    return result


async def _publish_one(url: str, seq: int) -> None:
    app = _publisher(url, seq + 1)
    async with app:
        await app.publish(TOPIC, make_event(seq))


def latency(server: RedisServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """`app.publish` at a steady rate from this process; a worker process handles them."""
    from bench.cases.raw import latencies

    warmup = round(cfg.warmup_seconds * cfg.rate)
    total = warmup + round(cfg.latency_seconds * cfg.rate)
    with server.client() as r:
        r.flushall()
        r.xgroup_create(stream_key(), "latency", id="0", mkstream=True)
        worker = WorkerRun(children, server, "latency", out, expect=total)
        worker.wait(lambda: blocked_readers(r) >= 1, timeout=60, what="the worker to start")

        async def publish() -> None:
            app = build_app("latency", topic=TOPIC, broker=server.url)
            async with app:

                async def send(i: int) -> None:
                    await app.publish(TOPIC, make_event(i, sent_at=time.monotonic()))

                achieved = await paced(cfg.rate, total, send)
            if achieved < 0.95 * cfg.rate:
                progress(f"  note: the publisher reached only {achieved:,.0f} events/s")

        asyncio.run(publish())
        worker.wait(
            lambda: groups_done(r, stream_key(), ["latency"], total),
            timeout=60,
            what="the worker to handle the latency run's events",
        )
    stats = worker.stop()
    return latencies("omni", stats[0]["latencies"], warmup)
