"""`python -m bench.instructions`: what the drain costs one worker per event, counted by
valgrind (instructions and simulated cache misses), for one or more variants.

    python -m bench.instructions off:OMNIDAEMON_TRACE_TTL=0 on     # what traces cost
    python -m bench.instructions before:rev=HEAD~1 after            # a change to the hot path

Variants are written as for `python -m bench.ab` (`NAME[:KEY=VALUE,...]`, with `rev=`,
`tree=` and environment variables). For each, the worker drains N1 and then N2 pre-filled
events under `valgrind --tool=cachegrind --cache-sim=yes`, and the difference of the two
counts over N2 - N1 is the cost of one event (start-up and shutdown cancel out). The table
shows instructions, first-level data-cache misses and last-level misses per event, a cost
estimate (instructions + 10 x first-level + 100 x last-level misses: the cycles a miss
costs, roughly), and that estimate over the first variant's.

Wall-clock drains on shared machines swing by 2x; these counts repeat within about 1-2 %
from run to run (the worker's periodic work is spaced out under valgrind: see
`bench/steady/sitecustomize.py`), so they show differences the A/B drains cannot. They do
not see the kernel's work or the server's: confirm a change with `python -m bench.ab`.
Needs valgrind (`apt-get install valgrind`); about a minute per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.ab import Variant, parse_variants, worktree
from bench.cases.omni import TOPIC, _prefill, groups_done, stream_key
from bench.common import ROOT, BenchError, RedisServer, progress

_STEADY = ROOT / "bench" / "steady"
_EVENTS = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw")


@dataclass
class Counts:
    """Per-event counts of one variant."""

    instructions: float
    l1_misses: float
    ll_misses: float

    @property
    def cost(self) -> float:
        return self.instructions + 10 * self.l1_misses + 100 * self.ll_misses


def _drain(server: RedisServer, variant: Variant, n: int, out: Path) -> dict[str, int]:
    """Drain `n` events with the variant's worker under cachegrind; its totals."""
    with server.client() as r:
        r.flushall()
        asyncio.run(_prefill(server.url, n, 500))
        r.xgroup_create(stream_key(), "sink_0", id="0", mkstream=True)
    counts = out / f"cachegrind-{variant.name}-{n}.out"
    env = {
        **os.environ,
        "OMNIDAEMON_BROKER_URL": server.url,
        "OMNIDAEMON_HEARTBEAT_INTERVAL": "1000",
        "OMNI_BENCH_TOPIC": TOPIC,
        "OMNI_BENCH_FANOUT": "1",
        "OMNI_BENCH_STEADY": "1",
        "PYTHONHASHSEED": "0",  # the same hashing, so the same collisions, every run
        "PYTHONPATH": f"{variant.root}{os.pathsep}{_STEADY}",
        **variant.env,
    }
    argv = [
        "valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--cachegrind-out-file={counts}",
        sys.executable, "-m", "omnidaemon", "worker", "bench.apps:drain", "--log-level", "WARNING",
    ]  # fmt: skip
    if variant.concurrency is not None:
        argv += ["--concurrency", str(variant.concurrency)]
    log = (out / f"worker-{variant.name}-{n}.log").open("w")
    proc = subprocess.Popen(argv, cwd=variant.root, env=env, stdout=log, stderr=log)
    try:
        with server.client() as r:
            deadline = time.monotonic() + 120 + n * 0.05
            while not groups_done(r, stream_key(), ["sink_0"], n):
                if proc.poll() is not None:
                    raise BenchError(f"the worker exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError(f"the worker did not drain {n} events in time")
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = counts.read_text()
    names = text.split("\nevents:", 1)[1].split("\n", 1)[0].split()
    totals = text.split("\nsummary:", 1)[1].split("\n", 1)[0].split()
    return dict(zip(names, map(int, totals), strict=True))


def measure(variant: Variant, server: RedisServer, n1: int, n2: int, out: Path) -> Counts:
    """The variant's counts per event: (drain of n2 - drain of n1) / (n2 - n1)."""
    # Compiled first: otherwise the first drain of a new checkout also counts compiling it.
    for root in {variant.root, ROOT}:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "omnidaemon", "bench"],
            cwd=root,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    small = _drain(server, variant, n1, out)
    large = _drain(server, variant, n2, out)
    per = {e: (large.get(e, 0) - small.get(e, 0)) / (n2 - n1) for e in _EVENTS}
    counts = Counts(per["Ir"], per["D1mr"] + per["D1mw"], per["DLmr"] + per["DLmw"])
    progress(f"{variant.name}: {counts.instructions:,.0f} instructions an event")
    return counts


def table(results: list[tuple[Variant, Counts]], n1: int, n2: int) -> str:
    first = results[0][1]
    lines = [
        f"One worker draining {n1:,} and {n2:,} events under cachegrind; per event: the "
        f"difference over {n2 - n1:,}. Cost: instructions + 10 x L1 + 100 x LL misses.",
        "",
        f"| variant | instructions | L1 data misses | LL misses | cost | vs {results[0][0].name} |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for variant, c in results:
        lines.append(
            f"| {variant.name} | {c.instructions:,.0f} | {c.l1_misses:,.0f} | "
            f"{c.ll_misses:,.1f} | {c.cost:,.0f} | {c.cost / first.cost:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="The drain's cost per event in instructions and cache misses (valgrind).",
    )
    parser.add_argument("variants", nargs="+", help="NAME[:KEY=VALUE,...] (as bench.ab)")
    parser.add_argument("--n1", type=int, default=1_000, help="events of the short drain")
    parser.add_argument("--n2", type=int, default=4_000, help="events of the long drain")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep cachegrind's files there (compare variants by function with cg_diff)",
    )
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
        if not 0 < args.n1 < args.n2:
            raise ValueError("--n1 and --n2 must be 0 < n1 < n2")
    except ValueError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 1
    server = RedisServer()
    try:
        with contextlib.ExitStack() as stack:
            for variant in variants:
                if variant.rev is not None:
                    variant.root = stack.enter_context(worktree(variant.rev))
            server.start()
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                out = args.keep
            else:
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="omnibench-vg-")))
            results = [(v, measure(v, server, args.n1, args.n2, out)) for v in variants]
    except BenchError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    print(table(results, args.n1, args.n2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
