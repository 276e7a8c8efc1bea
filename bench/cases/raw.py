"""The floor: what a plain redis-py asyncio loop does with the same events on the same server.

- publish: pipelined XADD (batches of `batch`), and one awaited XADD at a time;
- drain: XREADGROUP COUNT 100 + one XACK per batch, each entry validated into `BenchEvent`
  and passed to a no-op async handler, in a process of its own (`python -m bench.cases.raw`);
- latency: the same consumer blocked in XREADGROUP BLOCK while the benchmark XADDs at a steady
  rate.

Every XADD carries `MAXLEN ~ 100000`, as omnidaemon's do (its default stream bound), so both
ask the server for the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.common import (
    BenchError,
    Children,
    Config,
    RedisServer,
    blocked_readers,
    make_event,
    release,
    wait_until,
)
from bench.peers._shared import BenchEvent, Recorder, paced

STREAM = "bench:raw"
GROUP = "raw"
MAXLEN = 100_000
FETCH = 100


# Publishing, measured in the benchmark's process ----------------------------------------------


async def _pipelined(r: aioredis.Redis, events: list[BenchEvent]) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(STREAM, {"e": event.model_dump_json()}, maxlen=MAXLEN, approximate=True)
        await pipe.execute()


async def _publish_rates(url: str, events: list[BenchEvent], batch: int) -> dict[str, float]:
    r = aioredis.Redis.from_url(url)
    try:
        # Warm-up (not timed): a connection in the pool, the stream created, the code paths hot.
        await _pipelined(r, events[:batch])
        for event in events[:100]:
            await r.xadd(STREAM, {"e": event.model_dump_json()}, maxlen=MAXLEN, approximate=True)

        start = time.perf_counter()
        for i in range(0, len(events), batch):
            await _pipelined(r, events[i : i + batch])
        pipelined = len(events) / (time.perf_counter() - start)

        start = time.perf_counter()
        for event in events:
            await r.xadd(STREAM, {"e": event.model_dump_json()}, maxlen=MAXLEN, approximate=True)
        awaited = len(events) / (time.perf_counter() - start)
    finally:
        await r.aclose()
    return {"raw.publish_pipelined": pipelined, "raw.publish_awaited": awaited}


def publish(server: RedisServer, cfg: Config) -> dict[str, float]:
    with server.client() as r:
        r.flushall()
    events = [make_event(i) for i in range(cfg.n)]
    return asyncio.run(_publish_rates(server.url, events, cfg.batch))


def warm_server(server: RedisServer, cfg: Config) -> None:
    """Fill and empty the fresh server once, unmeasured, so that the first case measured does
    not pay for the server's first memory allocations."""
    asyncio.run(prefill(server.url, [make_event(i) for i in range(cfg.n)], cfg.batch))
    with server.client() as r:
        r.flushall()


async def prefill(url: str, events: list[BenchEvent], batch: int = 1000) -> None:
    r = aioredis.Redis.from_url(url)
    try:
        for i in range(0, len(events), batch):
            await _pipelined(r, events[i : i + batch])
    finally:
        await r.aclose()


# The consumer, in a process of its own ---------------------------------------------------------


def _consumer(children: Children, server: RedisServer, mode: str, expect: int, out: Path) -> Any:
    argv = [sys.executable, "-m", "bench.cases.raw", mode, "--url", server.url]
    argv += ["--expect", str(expect)]
    return children.start(argv, stdout=subprocess.PIPE, log=out / "raw-consumer.log")


def _result(proc: Any, out: Path, timeout: float) -> dict[str, Any]:
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Children.stop(proc)
        raise BenchError(f"the raw consumer did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        log = (out / "raw-consumer.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"the raw consumer exited with {proc.returncode}:\n{log}")
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def drain(server: RedisServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """Time one consumer process draining N pre-filled events, from its first handled event
    to its N-th; it starts, as omnidaemon's workers do, with nothing to read until it waits in
    XREADGROUP (see `bench.cases.omni.drain`)."""
    with server.client() as r:
        r.flushall()
        asyncio.run(prefill(server.url, [make_event(i) for i in range(cfg.n - 1)]))
        r.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        proc = _consumer(children, server, "drain", cfg.n, out)
        wait_until(
            lambda: blocked_readers(r) >= 1 or proc.poll() is not None,
            timeout=30,
            what="the raw consumer to start",
        )
        release(r, STREAM, [GROUP])
        asyncio.run(prefill(server.url, [make_event(cfg.n - 1)]))
    stats = _result(proc, out, timeout=60 + cfg.n / 1000)
    elapsed = stats["last"] - stats["first"]
    return {"raw.drain": cfg.n / elapsed, "raw.drain_cpu": stats["cpu"] / cfg.n}


def latency(server: RedisServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """XADD at a steady rate while a consumer process waits in XREADGROUP BLOCK."""
    warmup = round(cfg.warmup_seconds * cfg.rate)
    total = warmup + round(cfg.latency_seconds * cfg.rate)
    with server.client() as r:
        r.flushall()
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    proc = _consumer(children, server, "latency", total, out)
    with server.client() as r:
        wait_until(
            lambda: blocked_readers(r) >= 1 or proc.poll() is not None,
            timeout=30,
            what="the raw consumer to start",
        )

    async def publish() -> None:
        r = aioredis.Redis.from_url(server.url)
        try:
            await r.ping()

            async def send(i: int) -> None:
                event = make_event(i, sent_at=time.monotonic())
                await r.xadd(
                    STREAM, {"e": event.model_dump_json()}, maxlen=MAXLEN, approximate=True
                )

            await paced(cfg.rate, total, send)
        finally:
            await r.aclose()

    asyncio.run(publish())
    stats = _result(proc, out, timeout=60)
    return latencies("raw", stats["latencies"], warmup)


def latencies(name: str, samples: list[list[float]], warmup: int) -> dict[str, float]:
    """p50 and p99 (ms) of the samples past the warm-up."""
    from bench.peers._shared import percentile

    values = [lat for seq, lat in samples if seq >= warmup]
    if not values:
        raise BenchError(f"{name}: no latency samples past the warm-up")
    return {
        f"{name}.latency_p50": percentile(values, 0.50) * 1000,
        f"{name}.latency_p99": percentile(values, 0.99) * 1000,
    }


# python -m bench.cases.raw drain|latency ... ----------------------------------------------------


async def _consume(url: str, mode: str, expect: int) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url)
    rec = Recorder(expect)
    consumer = f"raw-{os.getpid()}"

    if mode == "drain":

        async def handle(event: BenchEvent) -> None:
            rec.hit()
    else:

        async def handle(event: BenchEvent) -> None:
            rec.latency(event)

    try:
        await r.ping()
        while rec.count < expect:
            response: Any = await r.xreadgroup(
                GROUP, consumer, {STREAM: ">"}, count=FETCH, block=2000
            )
            for _stream, entries in response or ():
                ids = []
                for entry_id, fields in entries:
                    await handle(BenchEvent.model_validate_json(fields[b"e"]))
                    ids.append(entry_id)
                await r.xack(STREAM, GROUP, *ids)
    finally:
        await r.aclose()
    return rec.summary()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cases.raw")
    parser.add_argument("mode", choices=["drain", "latency"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    try:
        summary = asyncio.run(_consume(args.url, args.mode, args.expect))
    except redis.RedisError as exc:
        print(f"raw consumer: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
