"""`python -m bench.profile`: where a draining worker's CPU goes, by py-spy.

    python -m bench.profile                      # 100,000 events, default concurrency
    python -m bench.profile --concurrency 100 -n 200000 --keep prof.txt
    python -m bench.profile --nats --concurrency 100   # the `nats://` broker, on nats-server

Starts its own redis-server (with `--nats`, a nats-server with JetStream) on a free loopback
port, pre-fills the topic, starts
`python -m omnidaemon worker bench.apps:drain` (as the benchmark's drain case does), attaches
`py-spy record` to it while it drains, and prints the share of the samples spent in each part
of the hot path. `--keep FILE` keeps py-spy's folded stacks ("raw" format), which speedscope
or flamegraph.pl turn into a flame graph. py-spy must be installed (`pip install py-spy`) and
allowed to attach (root, or ptrace permitted).

Sampling slows the worker down somewhat: read the shares, not the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.cases import nats
from bench.cases.omni import WorkerRun, _prefill, _publish_one, groups_done, stream_key
from bench.common import (
    BenchError,
    Children,
    NatsServer,
    RedisServer,
    blocked_readers,
    progress,
    release,
    scratch_dir,
)

# (what the samples are, a frame that identifies them); the first match from the top wins.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the handler itself (a no-op)", ("bench/apps.py",)),
    ("envelope + payload validation (pydantic, from bytes)", ("validate_json",)),
    ("fetch: XREADGROUP (redis-py, socket, reply parsing)", ("RedisBroker.fetch",)),
    # NATS (--nats): a fetch's pull requests and hand-out; what nats-py's read loop does with
    # each message the server pushes (parsing, the reader's callback) is its own part below.
    ("fetch: pull requests, hand-out (NATS broker)", ("NatsFetching.fetch", "NatsDelivery.fetch")),
    ("acks: +ACK per entry, flush (NatsDelivery.ack)", ("NatsDelivery.ack",)),
    ("acks and metrics: XACK pipeline", ("AckBatcher.",)),
    ("leases, reclaim, heartbeat", ("_renew_leases", "Heartbeat.", "reclaim")),
    ("handling: context, metrics, settling (omnidaemon)", ("AgentConsumer._handle",)),
    ("hand-off to handler tasks", ("HandOff.", "AgentConsumer._serve_handlers")),
    ("dispatch loop (omnidaemon)", ("AgentConsumer._dispatch",)),
    ("nats-py: read loop, message parsing, callbacks, flusher", ("nats/aio/",)),
    ("event loop: waiting in epoll", ("EpollSelector.select", "select.epoll")),
    ("event loop: scheduling and socket callbacks", ("asyncio/",)),
)


def classify(stack: str) -> str:
    """The part of `PARTS` a folded py-spy stack belongs to ("other" if none)."""
    for name, markers in PARTS:
        if any(marker in stack for marker in markers):
            return name
    return "other"


# Stacks of the worker's loop watchdog thread, which waits between its checks (py-spy counts it
# as busy): left out of the samples, which are of the event loop's thread.
IGNORED = ("LoopWatchdog._watch",)


def summarise(folded: Path) -> tuple[Counter[str], int]:
    """Samples per part, and the total, from py-spy's raw (folded) output."""
    parts: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or any(marker in stack for marker in IGNORED):
            continue
        parts[classify(stack)] += int(count)
        total += int(count)
    return parts, total


def _py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise BenchError("py-spy is not installed: pip install py-spy")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-n", type=int, default=100_000, help="events to drain (100,000)")
    parser.add_argument("--concurrency", type=int, help="the worker's --concurrency")
    parser.add_argument("--rate", type=int, default=250, help="samples per second (250)")
    parser.add_argument("--keep", type=Path, help="keep py-spy's folded stacks in this file")
    parser.add_argument(
        "--nats", action="store_true", help="on a nats-server with JetStream (`nats://`)"
    )
    args = parser.parse_args(argv)
    try:
        spy = _py_spy()
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 2
    bus = _NatsDrain() if args.nats else _RedisDrain()
    children = Children()
    try:
        bus.server.start()
        with scratch_dir() as out:
            folded = args.keep or out / "profile.txt"
            bus.fill(args.n - 1)
            worker = WorkerRun(
                children, bus.server, "drain", out, expect=args.n, concurrency=args.concurrency
            )
            worker.wait(bus.waiting, timeout=60, what="the worker")
            sampler = subprocess.Popen(
                [spy, "record", "--pid", str(worker.proc.pid), "--format", "raw",
                 "--rate", str(args.rate), "--output", str(folded)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches (no sign of it to wait for); idle meanwhile
            bus.release(args.n - 1)
            worker.wait(
                lambda: bus.drained(args.n),
                timeout=60 + args.n / 500,
                what=f"the worker to drain {args.n} events",
            )
            # Stopped as soon as the drain is over: the samples are of the busy worker.
            sampler.send_signal(signal.SIGINT)
            _, errors = sampler.communicate(timeout=30)
            stats = worker.stop()
            if sampler.returncode != 0 or not folded.exists():
                raise BenchError(f"py-spy failed: {errors.strip()[-500:]}")
            parts, total = summarise(folded)
            rate = stats[0]["count"] / (stats[0]["last"] - stats[0]["first"])
            _print(parts, total, rate, args)
            if args.keep:
                progress(f"folded stacks kept in {args.keep}")
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        bus.server.stop()
    return 0


class _RedisDrain:
    """The drain of `bench.cases.omni.drain`, on a redis-server: the group created at the
    stream's end, moved back to its start once the worker waits in XREADGROUP."""

    def __init__(self) -> None:
        self.server = RedisServer()

    def fill(self, n: int) -> None:
        asyncio.run(_prefill(self.server.url, n, 1000))
        with self.server.client() as r:
            r.xgroup_create(stream_key(), "sink_0", id="$", mkstream=True)

    def waiting(self) -> bool:
        with self.server.client() as r:
            return blocked_readers(r) >= 1

    def release(self, last: int) -> None:
        with self.server.client() as r:
            release(r, stream_key(), ["sink_0"])
        asyncio.run(_publish_one(self.server.url, last))

    def drained(self, n: int) -> bool:
        with self.server.client() as r:
            return groups_done(r, stream_key(), ["sink_0"], n)


class _NatsDrain:
    """The drain of `bench.cases.nats.omni_drain`, on a nats-server: the agent's consumer
    paused while the stream fills, resumed once the worker waits in a pull request."""

    def __init__(self) -> None:
        self.server = NatsServer()

    def fill(self, n: int) -> None:
        asyncio.run(nats._omni_fill(self.server.url, "sink_0", n, 1000))

    def waiting(self) -> bool:
        return nats._waiting(self.server, nats.omni_stream(), "sink_0")

    def release(self, last: int) -> None:
        asyncio.run(nats._resume(self.server.url, nats.omni_stream(), "sink_0"))
        asyncio.run(_publish_one(self.server.url, last))

    def drained(self, n: int) -> bool:
        return nats._acked(self.server, nats.omni_stream(), "sink_0", n)


def _print(parts: Counter[str], total: int, rate: float, args: argparse.Namespace) -> None:
    concurrency = args.concurrency or "default (16)"
    bus = "nats-server" if args.nats else "redis-server"
    print(
        f"worker draining {args.n:,} events on {bus}, concurrency {concurrency}, sampled by py-spy"
    )
    print(f"at {args.rate}/s: {total:,} samples; {rate:,.0f} events/s while sampled")
    # A sample stands for 1/rate seconds of the worker's thread: its time per event, by part.
    per_event = 1e6 / args.rate / args.n
    print(f"sampled time per event: {total * per_event:.1f} µs\n")
    print("| part of the worker | share of samples | µs per event |")
    print("|---|--:|--:|")
    for name, _ in (*PARTS, ("other", ())):
        if parts[name]:
            share = 100 * parts[name] / total
            print(f"| {name} | {share:.1f}% | {parts[name] * per_event:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
