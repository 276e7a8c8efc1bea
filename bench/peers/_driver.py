"""The part of a peer's driver that does not depend on the peer: the command line, the drain and
latency procedures, and the JSON line on stdout.

A driver runs in `bench/.peers-venv` (the peer, redis-py and pydantic; never omnidaemon):

    python bench/peers/<peer>_driver.py drain --url URL -n N
    python bench/peers/<peer>_driver.py latency --url URL --rate R --seconds S --warmup W

`drain` pre-fills the peer's stream with N events through the peer's own publishing API, then
starts the peer's consumer and times it from its first handled event to its N-th (the
consumer's start-up is not counted). `latency` starts the consumer, then a publisher process
(this script, `publish` mode) sends events at a steady rate, each stamped with its send time;
the handler records the time since. Both print one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from _shared import BenchEvent, Recorder, emit, make_event, paced

__all__ = ["Peer", "main", "redis_versions"]


def redis_versions() -> dict[str, str]:
    """redis-py's version, and hiredis's if it is installed (redis-py then parses with it)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"redis-py": version("redis")}
    with contextlib.suppress(PackageNotFoundError):
        found["hiredis"] = version("hiredis")
    return found


class Peer(Protocol):
    """What a driver implements for its peer."""

    name: str
    stream: str
    group: str

    def versions(self) -> dict[str, str]: ...

    async def prefill(self, url: str, n: int) -> None:
        """Publish events 0..n-1 to the stream with the peer's own API."""

    async def start_consumer(self, url: str, on_event: Callable[[BenchEvent], None]) -> None:
        """Start consuming the stream in the background (consumer group `group`, ack after the
        handler); the handler receives the payload validated into `BenchEvent` by the peer and
        calls `on_event` with it."""

    async def stop_consumer(self) -> None: ...

    async def open_publisher(self, url: str) -> Callable[[BenchEvent], Awaitable[object]]:
        """Connect, and return a function that publishes one event with the peer's own API."""

    async def close_publisher(self) -> None: ...


def _log(peer: Peer, message: str) -> None:
    print(f"[{peer.name}] {message}", file=sys.stderr, flush=True)


async def _reset(url: str, peer: Peer) -> None:
    """An empty stream with the group created at its start, so the pre-filled events are read
    (the peers would create it at `$`, the end, by default)."""
    r = aioredis.Redis.from_url(url)
    try:
        await r.delete(peer.stream)
        await r.xgroup_create(peer.stream, peer.group, id="0", mkstream=True)
    finally:
        await r.aclose()


async def _wait_acked(url: str, peer: Peer, timeout: float = 10.0) -> bool:
    """Wait until the group has nothing pending: every handled event was acknowledged."""
    r = aioredis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            groups = await r.xinfo_groups(peer.stream)
            if all(g["pending"] == 0 for g in groups if g["name"].decode() == peer.group):
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await r.aclose()


def _checked(on_event: Callable[[BenchEvent], None]) -> Callable[[BenchEvent], None]:
    def check(event: BenchEvent) -> None:
        if not isinstance(event, BenchEvent):
            raise TypeError(f"the peer passed a {type(event).__name__}, not a BenchEvent")
        on_event(event)

    return check


async def drain(peer: Peer, url: str, n: int) -> dict[str, Any]:
    await _reset(url, peer)
    _log(peer, f"pre-filling {n} events")
    await peer.prefill(url, n)
    rec = Recorder(n)
    done = asyncio.Event()

    def on_event(event: BenchEvent) -> None:
        rec.hit()
        if rec.count >= n:
            done.set()

    await peer.start_consumer(url, _checked(on_event))
    try:
        await asyncio.wait_for(done.wait(), timeout=60 + n / 200)
        acked = await _wait_acked(url, peer)
    finally:
        await peer.stop_consumer()
    elapsed = rec.last - rec.first
    return {
        "peer": peer.name,
        "versions": peer.versions(),
        "count": rec.count,
        "rate": n / elapsed,
        "cpu": rec.summary()["cpu"],
        "acked": acked,
    }


async def latency(
    peer: Peer, url: str, rate: float, seconds: float, warmup: float
) -> dict[str, Any]:
    await _reset(url, peer)
    skip = round(warmup * rate)
    total = skip + round(seconds * rate)
    rec = Recorder(total)
    done = asyncio.Event()

    def on_event(event: BenchEvent) -> None:
        rec.latency(event)
        if rec.count >= total:
            done.set()

    await peer.start_consumer(url, _checked(on_event))
    try:
        await asyncio.sleep(0.5)  # started and fetching
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, sys.argv[0], "publish", "--url", url,
            "--rate", str(rate), "--count", str(total),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await publisher.communicate()
        if publisher.returncode != 0:
            raise RuntimeError(f"the {peer.name} publisher exited with {publisher.returncode}")
        sent = json.loads(stdout.decode().strip().splitlines()[-1])
        await asyncio.wait_for(done.wait(), timeout=60)
        acked = await _wait_acked(url, peer)
    finally:
        await peer.stop_consumer()
    return {
        "peer": peer.name,
        "versions": peer.versions(),
        "count": rec.count,
        "published_rate": sent["rate"],
        "acked": acked,
        "latencies": [(seq, lat) for seq, lat in rec.latencies if seq >= skip],
    }


async def publish(peer: Peer, url: str, rate: float, count: int) -> dict[str, Any]:
    send = await peer.open_publisher(url)
    try:
        achieved = await paced(rate, count, lambda i: send(make_event(i, sent_at=time.monotonic())))
    finally:
        await peer.close_publisher()
    return {"rate": achieved}


def main(peer: Peer) -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]))
    parser.add_argument("mode", choices=["drain", "latency", "publish", "versions"])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    # The peers' own per-message log lines stay below this level, as omnidaemon's do under
    # `--log-level WARNING`.
    logging.basicConfig(level=logging.WARNING)
    if args.mode == "drain":
        result = asyncio.run(drain(peer, args.url, args.n))
    elif args.mode == "latency":
        result = asyncio.run(latency(peer, args.url, args.rate, args.seconds, args.warmup))
    elif args.mode == "publish":
        result = asyncio.run(publish(peer, args.url, args.rate, args.count))
    else:
        result = {"peer": peer.name, "versions": peer.versions()}
    emit(result)
