"""`python -m bench.profile`: where a draining worker's CPU goes, by py-spy.

    python -m bench.profile                      # 100,000 events, default concurrency
    python -m bench.profile --concurrency 100 -n 200000 --keep prof.txt

Starts its own redis-server on a free loopback port, pre-fills the topic, starts
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

from bench.cases.omni import WorkerRun, _prefill, _publish_one, groups_done, stream_key
from bench.common import (
    BenchError,
    Children,
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
    ("acks and metrics: XACK pipeline", ("AckBatcher.",)),
    ("leases, reclaim, heartbeat", ("_renew_leases", "Heartbeat.", "reclaim")),
    ("handling: context, metrics, settling (omnidaemon)", ("AgentConsumer._handle",)),
    ("hand-off to handler tasks", ("HandOff.", "AgentConsumer._serve_handlers")),
    ("dispatch loop (omnidaemon)", ("AgentConsumer._dispatch",)),
    ("event loop: waiting in epoll", ("EpollSelector.select", "select.epoll")),
    ("event loop: scheduling and socket callbacks", ("asyncio/",)),
)


def classify(stack: str) -> str:
    """The part of `PARTS` a folded py-spy stack belongs to ("other" if none)."""
    for name, markers in PARTS:
        if any(marker in stack for marker in markers):
            return name
    return "other"


def summarise(folded: Path) -> tuple[Counter[str], int]:
    """Samples per part, and the total, from py-spy's raw (folded) output."""
    parts: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
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
    args = parser.parse_args(argv)
    try:
        spy = _py_spy()
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 2
    server, children = RedisServer(), Children()
    try:
        server.start()
        with scratch_dir() as out:
            folded = args.keep or out / "profile.txt"
            with server.client() as r:
                asyncio.run(_prefill(server.url, args.n - 1, 1000))
                r.xgroup_create(stream_key(), "sink_0", id="$", mkstream=True)
                worker = WorkerRun(
                    children, server, "drain", out, expect=args.n, concurrency=args.concurrency
                )
                worker.wait(lambda: blocked_readers(r) >= 1, timeout=60, what="the worker")
                sampler = subprocess.Popen(
                    [spy, "record", "--pid", str(worker.proc.pid), "--format", "raw",
                     "--rate", str(args.rate), "--output", str(folded)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                time.sleep(1.0)  # py-spy attaches (no sign of it to wait for); idle meanwhile
                release(r, stream_key(), ["sink_0"])
                asyncio.run(_publish_one(server.url, args.n - 1))
                worker.wait(
                    lambda: groups_done(r, stream_key(), ["sink_0"], args.n),
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
        server.stop()
    return 0


def _print(parts: Counter[str], total: int, rate: float, args: argparse.Namespace) -> None:
    concurrency = args.concurrency or "default (16)"
    print(f"worker draining {args.n:,} events, concurrency {concurrency}, sampled by py-spy")
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
