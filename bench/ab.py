"""`python -m bench.ab`: the omnidaemon drain under two or more variants, in turn, in one run.

    python -m bench.ab before:rev=HEAD~1 after                      # a change to the hot path
    python -m bench.ab off:OMNIDAEMON_TRACE_TTL=0 on --reps 15      # a setting, on and off
    python -m bench.ab a:concurrency=16 b:concurrency=64 -n 50000

A variant is `NAME` or `NAME:KEY=VALUE,...`. `rev=REV` runs the worker from a checkout of that
git revision (a temporary worktree, removed at the end), `tree=PATH` from another checkout,
`concurrency=N` passes `--concurrency N`; any other key is an environment variable of the
worker. Every repetition drains N pre-filled events once per variant (the order turns about),
on one redis-server pinned to its own CPU (`bench.cases.traces.pin`); the table shows each
variant's median rate and CPU per event, and the median over repetitions of its rate divided
by the first variant's in the same repetition.

Machines here swing by 2x from one minute to the next (other tenants of the host): only
figures of the same run compare, per-run ratios more than medians, and a difference under the
spread of the per-run ratios is no difference.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.cases import omni, traces
from bench.common import (
    ROOT,
    BenchError,
    Children,
    Config,
    RedisServer,
    median,
    progress,
    scratch_dir,
)


@dataclass
class Variant:
    """One way to run the drain: from which checkout, with what environment."""

    name: str
    root: Path = ROOT
    rev: str | None = None
    concurrency: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    """`NAME[:KEY=VALUE,...]` as a `Variant`; `ValueError` with what is wrong."""
    name, _, options = spec.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: a variant needs a name")
    variant = Variant(name)
    for option in filter(None, options.split(",")):
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"{spec!r}: {option!r} is not KEY=VALUE")
        if key == "rev":
            variant.rev = value
        elif key == "tree":
            variant.root = Path(value).resolve()
            if not (variant.root / "omnidaemon").is_dir():
                raise ValueError(f"{spec!r}: {value} is not an omnidaemon checkout")
        elif key == "concurrency":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{spec!r}: concurrency must be a whole number above 0")
            variant.concurrency = int(value)
        else:
            variant.env[key] = value
    return variant


def parse_variants(specs: list[str]) -> list[Variant]:
    """The variants named on a command line; `ValueError` with what is wrong."""
    variants = [parse_variant(spec) for spec in specs]
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("variant names must differ")
    return variants


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached checkout of `rev`, removed afterwards (its worker runs with this
    interpreter: `python -m` imports from the working directory first)."""
    path = Path(tempfile.mkdtemp(prefix="omnibench-ab-")) / "tree"
    git = ["git", "-C", str(ROOT)]
    done = subprocess.run(
        [*git, "worktree", "add", "--detach", str(path), rev], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"cannot check out {rev!r}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)


def run(variants: list[Variant], cfg: Config) -> None:
    """Drain once per variant per repetition, filling each variant's figures."""
    server = RedisServer()
    server.start()
    children = Children()
    pinned = traces.pin(server)
    try:
        with scratch_dir() as out:
            for rep in range(cfg.reps):
                for variant in variants[:: 1 if rep % 2 == 0 else -1]:
                    result = omni.drain(
                        server,
                        children,
                        cfg,
                        out,
                        n=cfg.n,
                        concurrency=variant.concurrency,
                        env=variant.env or None,
                        root=variant.root,
                    )
                    variant.rates.append(result["rate"])
                    variant.cpus.append(result.get("cpu", float("nan")) * 1e6)
                    progress(
                        f"#{rep + 1} {variant.name}: {result['rate']:,.0f} events/s, "
                        f"{variant.cpus[-1]:.1f} µs CPU an event"
                    )
    finally:
        traces.unpin(pinned)
        children.stop_all()
        server.stop()


def table(variants: list[Variant], cfg: Config) -> str:
    """The results as a Markdown table."""
    first = variants[0]
    lines = [
        f"Drain of N = {cfg.n:,} events, one worker process; median of {cfg.reps} runs; "
        f"each run's rate over {first.name}'s in the same repetition.",
        "",
        f"| variant | events/s | CPU µs/event | vs {first.name} (per run, median) | per run |",
        "|---|--:|--:|--:|---|",
    ]
    for v in variants:
        ratios = [a / b for a, b in zip(v.rates, first.rates, strict=True)]
        runs = " / ".join(f"{r:.2f}" for r in ratios)
        lines.append(
            f"| {v.name} | {median(v.rates):,.0f} | {median(v.cpus):.1f} | "
            f"{median(ratios):.3f} | {runs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description="The omnidaemon drain under two or more variants, in turn, in one run.",
    )
    parser.add_argument("variants", nargs="+", help="NAME[:KEY=VALUE,...] (see the module doc)")
    parser.add_argument("-n", type=int, default=20_000, help="events per drain (20,000)")
    parser.add_argument("--reps", type=int, default=10, help="repetitions (10)")
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 2
    cfg = Config(n=max(2, args.n), reps=max(1, args.reps))
    try:
        with contextlib.ExitStack() as stack:
            for variant in variants:
                if variant.rev is not None:
                    variant.root = stack.enter_context(worktree(variant.rev))
            run(variants, cfg)
    except BenchError as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 1
    print(table(variants, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
