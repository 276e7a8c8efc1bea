"""Redis Cluster (`--cases cluster`, issue 17): omnidaemon on a local cluster of 3 masters with
a replica each, against redis-py's own cluster client (`redis.asyncio.cluster.RedisCluster`)
doing the same XADD and XREADGROUP + XACK work in the same run; then what `min_replicas=1`
(a `WAIT 1` after every publish and settle) costs on the same cluster.

- routing, on one topic (one master) and spread: events dealt in turn over `SPREAD` topics,
  two on each master. Raw streams carry the topic as their hash tag (`raw:{<topic>}:stream`),
  so raw and omnidaemon load the same masters. publish (`publish`): every publisher takes
  turns in one process, pipelined 1,000 per batch (the cluster client sends one pipeline per
  master, at once; `app.publish_many` likewise) and one awaited publish at a time, with each
  call's latency. drain: a consumer process, raw (one reader task per stream, XREADGROUP
  COUNT 100 + XACK per batch) or a worker with one agent per topic at `--concurrency 100`;
  started and timed as the single-server drain is.
- durability, on one topic: omnidaemon with `min_replicas=1` against `min_replicas=0`, and,
  for the floor, a plain redis-py client on the topic's master sending XADD then `WAIT 1` on
  the same connection against the same without `WAIT` (the cluster client cannot put WAIT
  on the connection the XADD went on: it sends keyless commands to every node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.cluster import RedisCluster as SyncCluster

from bench.apps import build_app
from bench.cases import omni
from bench.cases.raw import _result
from bench.common import BenchError, Children, Config, LocalCluster, make_event, wait_until
from bench.peers._shared import BenchEvent, Recorder, percentile
from omnidaemon.brokers.redis import RedisBroker

TOPIC = omni.TOPIC
SPREAD = 6  # topics of the spread rows: two on each of the 3 masters
GROUP = "raw"
MAXLEN = 100_000
FETCH = 100
WAIT_MS = 10_000  # WAIT's timeout: omnidaemon's, its default publish_timeout
AWAITED_BLOCK = 500  # awaited publishes each publisher makes in its turn


def raw_key(topic: str) -> str:
    """A raw stream in the same slot as the topic's omnidaemon stream."""
    return f"raw:{{{topic}}}:stream"


def spread_topics(cluster: LocalCluster, count: int = SPREAD) -> list[str]:
    """`count` topics, as many on each master, in turn: master 1, 2, 3, 1, 2, 3..."""
    per = count // len(cluster.master_ports)
    chosen: dict[int, list[str]] = {port: [] for port in cluster.master_ports}
    i = 0
    while any(len(topics) < per for topics in chosen.values()):
        topic = f"{TOPIC}.{i}"
        mine = chosen[cluster.master_of(omni.stream_key(topic))]
        if len(mine) < per:
            mine.append(topic)
        i += 1
    return [topics[j] for j in range(per) for topics in chosen.values()]


@contextlib.contextmanager
def control(cluster: LocalCluster) -> Iterator[Any]:
    """A synchronous cluster client, for setting up and watching the runs."""
    client = SyncCluster.from_url(cluster.url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def _payload(event: BenchEvent) -> dict[str, str]:
    return {"e": event.model_dump_json()}


# Publishing -----------------------------------------------------------------------------------


async def _cluster_pipelined(
    rc: AsyncCluster, keys: Sequence[str], events: Sequence[BenchEvent], offset: int
) -> None:
    pipe = rc.pipeline()
    for j, event in enumerate(events):
        key = keys[(offset + j) % len(keys)]
        pipe.xadd(key, _payload(event), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
    await pipe.execute()


Batch = Sequence[tuple[str, BenchEvent]]  # (topic, event)


@dataclass
class _Publisher:
    """One way of publishing, and the result keys of its figures."""

    name: str
    batch: Callable[[Batch], Awaitable[object]]  # one pipelined batch
    one: Callable[[BenchEvent], Awaitable[object]]  # one event to TOPIC, awaited
    pipelined: str  # result keys: pipelined on one topic, spread (None: not run), awaited
    spread: str | None
    awaited: str


async def _turns(
    publishers: Sequence[_Publisher],
    events: Sequence[BenchEvent],
    block: int,
    run: Callable[[_Publisher, Sequence[BenchEvent], int], Awaitable[list[float]]],
    settle: Callable[[], Awaitable[None]],
) -> list[tuple[float, list[float]]]:
    """Each publisher sends every `block` of `events` in turn, the order rotating each block,
    every one starting with the replicas caught up (`settle`, not timed). Returns each one's
    total time and the times of its calls `run` reported."""
    totals = [0.0] * len(publishers)
    calls: list[list[float]] = [[] for _ in publishers]
    for turn, i in enumerate(range(0, len(events), block)):
        chunk = events[i : i + block]
        for k in range(len(publishers)):
            index = (turn + k) % len(publishers)
            await settle()
            start = time.perf_counter()
            calls[index] += await run(publishers[index], chunk, i)
            totals[index] += time.perf_counter() - start
    return list(zip(totals, calls, strict=True))


async def _publish(
    cluster: LocalCluster, topics: Sequence[str], events: list[BenchEvent], batch: int
) -> dict[str, float]:
    url, one_key = cluster.url, raw_key(TOPIC)
    rc = AsyncCluster.from_url(url)
    node = aioredis.Redis(host="127.0.0.1", port=cluster.master_of(one_key))
    # A key on each master, written then WAITed for by `settle`: every replica caught up.
    syncs = [(aioredis.Redis(host="127.0.0.1", port=p), key) for p, key in cluster.sync_keys()]
    apps = [
        build_app("drain", topics=[TOPIC, *topics], broker=RedisBroker(url, min_replicas=m))
        for m in (0, 1)
    ]

    async def settle() -> None:
        for r, key in syncs:
            async with r.pipeline(transaction=False) as pipe:
                pipe.set(key, 1)
                pipe.execute_command("WAIT", 1, WAIT_MS)
                await pipe.execute()

    async def raw_batch(batch: Batch) -> None:
        pipe = rc.pipeline()
        for topic, event in batch:
            pipe.xadd(raw_key(topic), _payload(event), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()

    async def raw_one(event: BenchEvent) -> None:
        await rc.xadd(one_key, _payload(event), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]

    def on_master(wait: bool) -> tuple[Callable[[Batch], Awaitable[None]], Any]:
        key = f"node{'-wait' if wait else ''}:{{{TOPIC}}}:stream"

        async def send(batch: Batch) -> None:
            async with node.pipeline(transaction=False) as pipe:
                for _topic, event in batch:
                    pipe.xadd(key, _payload(event), maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
                if wait:
                    pipe.execute_command("WAIT", 1, WAIT_MS)
                replies = await pipe.execute()
            if wait and replies[-1] < 1:
                raise BenchError(f"WAIT 1: {replies[-1]} replicas confirmed the XADDs")

        return send, lambda event: send([(TOPIC, event)])

    node_batch, node_one = on_master(False)
    wait_batch, wait_one = on_master(True)
    publishers = [
        _Publisher(
            "raw", raw_batch, raw_one, "cluster.raw.publish_pipelined",
            "cluster.raw.publish_pipelined_spread", "cluster.raw.publish_awaited",
        ),
        *(
            _Publisher(
                name, app.publish_many, partial(app.publish, TOPIC), f"cluster.{name}.publish_many",
                f"cluster.{name}.publish_many_spread", f"cluster.{name}.publish",
            )
            for name, app in (("omni", apps[0]), ("mr1", apps[1]))
        ),
        _Publisher(
            "node", node_batch, node_one, "cluster.node.publish_pipelined", None,
            "cluster.node.publish_awaited",
        ),
        _Publisher(
            "node-wait", wait_batch, wait_one, "cluster.node.publish_pipelined_wait", None,
            "cluster.node.publish_awaited_wait",
        ),
    ]  # fmt: skip

    def pipelined(on: Sequence[str]) -> Callable[..., Awaitable[list[float]]]:
        async def run(publisher: _Publisher, chunk: Sequence[BenchEvent], i: int) -> list[float]:
            await publisher.batch([(on[(i + j) % len(on)], e) for j, e in enumerate(chunk)])
            return []

        return run

    async def awaited(publisher: _Publisher, chunk: Sequence[BenchEvent], i: int) -> list[float]:
        took = []
        for event in chunk:
            start = time.perf_counter()
            await publisher.one(event)
            took.append(time.perf_counter() - start)
        return took

    figures: dict[str, float] = {}
    n = len(events)
    try:
        for app in apps:
            await app.connect()
        for publisher in publishers:  # warm-up, not timed
            await pipelined(topics)(publisher, events[:batch], 0)
            await awaited(publisher, events[:100], 0)
        phases: list[tuple[Callable[[_Publisher], str | None], Any, int]] = [
            (lambda p: p.pipelined, pipelined([TOPIC]), batch),
            (lambda p: p.spread, pipelined(topics), batch),
            (lambda p: p.awaited, awaited, AWAITED_BLOCK),
        ]
        for key_of, run, block in phases:
            cluster.flushall()
            racing = [p for p in publishers if key_of(p) is not None]
            for publisher, (total, took) in zip(
                racing, await _turns(racing, events, block, run, settle), strict=True
            ):
                key = key_of(publisher)
                assert key is not None
                figures[key] = n / total
                if took:
                    figures[f"{key}_p50"] = percentile(took, 0.50) * 1000
                    figures[f"{key}_p99"] = percentile(took, 0.99) * 1000
    finally:
        for app in apps:
            await app.close()
        for r in (node, *(r for r, _ in syncs)):
            await r.aclose()
        await rc.aclose()
    return figures


def publish(cluster: LocalCluster, cfg: Config, topics: Sequence[str]) -> dict[str, float]:
    """Every publishing figure of the cluster case, in one run: redis-py's cluster client,
    omnidaemon with min_replicas 0 and 1, and a plain client on the topic's master without and
    with WAIT 1, taking turns (see `_turns`): pipelined on one topic, pipelined spread over
    `topics`, then one awaited publish at a time on one topic."""
    events = [make_event(i) for i in range(cfg.n)]
    return asyncio.run(_publish(cluster, topics, events, cfg.batch))


# Draining -------------------------------------------------------------------------------------


def _counts(n: int, parts: int) -> list[int]:
    """How many of events 0..n-1, dealt in turn over `parts` topics, each topic gets."""
    return [len(range(i, n, parts)) for i in range(parts)]


async def _raw_fill(url: str, keys: Sequence[str], n: int, batch: int) -> None:
    rc = AsyncCluster.from_url(url)
    try:
        for i in range(0, n, batch):
            chunk = [make_event(j) for j in range(i, min(n, i + batch))]
            await _cluster_pipelined(rc, keys, chunk, i)
    finally:
        await rc.aclose()


def raw_drain(
    cluster: LocalCluster, children: Children, cfg: Config, out: Path, topics: Sequence[str]
) -> float:
    """One consumer process (`python -m bench.cases.cluster`) draining N events dealt over
    `topics`' raw streams, timed as `bench.cases.raw.drain` is: the last event of each stream
    is published once its reader waits."""
    n, keys = cfg.n, [raw_key(t) for t in topics]
    cluster.flushall()
    asyncio.run(_raw_fill(cluster.url, keys, n - len(keys), cfg.batch))
    with control(cluster) as rc:
        for key in keys:
            rc.xgroup_create(key, GROUP, id="$", mkstream=True)
        argv = [sys.executable, "-m", "bench.cases.cluster", "--url", cluster.url]
        argv += ["--streams", ",".join(keys), "--expect", str(n)]
        proc = children.start(argv, stdout=subprocess.PIPE, log=out / "raw-consumer.log")
        wait_until(
            lambda: cluster.blocked_readers() >= len(keys) or proc.poll() is not None,
            timeout=30,
            what="the raw cluster consumer to start",
        )
        for key in keys:
            rc.xgroup_setid(key, GROUP, "0", entries_read=0)
        for i, key in enumerate(keys):
            rc.xadd(key, _payload(make_event(n - len(keys) + i)), maxlen=MAXLEN, approximate=True)
    stats = _result(proc, out, timeout=60 + n / 1000)
    return float(n / (stats["last"] - stats["first"]))


async def _omni_fill(url: str, topics: Sequence[str], n: int, batch: int, first: int = 0) -> None:
    app = build_app("drain", topics=topics, broker=url)
    async with app:
        for i in range(first, n, batch):
            chunk = range(i, min(n, i + batch))
            await app.publish_many([(topics[j % len(topics)], make_event(j)) for j in chunk])


def omni_drain(
    cluster: LocalCluster,
    children: Children,
    cfg: Config,
    out: Path,
    topics: Sequence[str],
    *,
    min_replicas: int = 0,
) -> float:
    """A worker with one agent on each of `topics` (`--concurrency 100`) draining N events
    dealt over them, started and timed as `bench.cases.omni.drain` does."""
    n, groups = cfg.n, [f"sink_{i}" for i in range(len(topics))]
    cluster.flushall()
    asyncio.run(_omni_fill(cluster.url, topics, n - len(topics), cfg.batch))
    with control(cluster) as rc:
        for topic, group in zip(topics, groups, strict=True):
            rc.xgroup_create(omni.stream_key(topic), group, id="$", mkstream=True)
        env = {
            "OMNI_BENCH_TOPICS": ",".join(topics),
            "OMNIDAEMON_REDIS_MIN_REPLICAS": str(min_replicas),
        }
        worker = omni.WorkerRun(children, cluster, "drain", out, expect=n, concurrency=100, env=env)
        worker.wait(
            lambda: cluster.blocked_readers() >= len(topics),
            timeout=60,
            what="the worker to start and wait for events",
        )
        for topic, group in zip(topics, groups, strict=True):
            rc.xgroup_setid(omni.stream_key(topic), group, "0", entries_read=0)
        asyncio.run(_omni_fill(cluster.url, topics, n, cfg.batch, first=n - len(topics)))
        counts = _counts(n, len(topics))

        def done() -> bool:
            return all(
                omni.groups_done(rc, omni.stream_key(topic), [group], count)
                for topic, group, count in zip(topics, groups, counts, strict=True)
            )

        worker.wait(done, timeout=60 + n / 500, what=f"the worker to drain {n} events")
    stats = worker.stop()
    handled = sum(s["count"] for s in stats)
    if handled != n:
        raise BenchError(f"the worker handled {handled} events, not {n}")
    return float(n / (stats[0]["last"] - stats[0]["first"]))


# python -m bench.cases.cluster --url ... --streams a,b --expect N -----------------------------


async def _consume(url: str, streams: Sequence[str], expect: int) -> dict[str, Any]:
    """One reader task per stream, sharing a counter; returns once `expect` were handled."""
    rc = AsyncCluster.from_url(url)
    rec = Recorder(expect)
    consumer = f"raw-{os.getpid()}"

    async def handle(event: BenchEvent) -> None:
        rec.hit()

    async def read(stream: str) -> None:
        races = 0
        while rec.count < expect:
            try:
                response: Any = await rc.xreadgroup(
                    GROUP, consumer, {stream: ">"}, count=FETCH, block=2000
                )
            except AttributeError:
                # redis-py's cluster client, when several tasks open a node's connections at
                # once, can use one before it is connected (`_writer` is None), while finding
                # XREADGROUP's keys: nothing was sent, so asking again loses nothing.
                races += 1
                if races > 3:
                    raise
                continue
            for _stream, entries in response or ():
                ids = []
                for entry_id, fields in entries:
                    await handle(BenchEvent.model_validate_json(fields[b"e"]))
                    ids.append(entry_id)
                await rc.xack(stream, GROUP, *ids)

    tasks = [asyncio.create_task(read(stream)) for stream in streams]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a reader that failed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rc.aclose()
    return rec.summary()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cases.cluster")
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    try:
        summary = asyncio.run(_consume(args.url, args.streams.split(","), args.expect))
    except redis.RedisError as exc:
        print(f"raw cluster consumer: {exc!r}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
