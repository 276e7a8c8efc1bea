"""The benchmark (`bench/`, issue 6) still runs: `python -m bench --smoke` end to end, and its
Redis Cluster case (issue 17) and flow-control case, which run only when named.

Not a performance test: the smoke mode measures 500 events once, and no figure is checked,
only that every case ran and is in the table. The benchmark starts its own redis-server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_runs_every_case() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for figure in (
        "publish: pipelined XADD",
        "publish: app.publish_many",
        "publish: one awaited app.publish",
        "drain: XREADGROUP 100 + XACK per batch",
        "drain: 1 worker process",
        "latency p50: XADD → XREADGROUP BLOCK",
        "latency p50: publish → handler",
        "1 agent: worker CPU per event",
        "worker RSS, retries scheduled",
    ):
        assert figure in table, f"{figure!r} missing from:\n{table}"
    assert "failed" not in table
    assert "RESULTS.md not written" in done.stderr  # a smoke run never overwrites the results


@pytest.mark.slow
def test_bench_smoke_runs_the_cluster_case() -> None:
    """`--cases cluster` (run only when named: it starts a 6-node Redis Cluster of its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--cases", "cluster"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for figure in (
        "publish, 1 topic: pipelined XADD",
        "publish, 6 topics on 3 masters: app.publish_many",
        "one awaited app.publish: p99",
        "drain, 6 topics on 3 masters: 1 worker process",
        "the same + WAIT 1",
        "min_replicas=1: p50",
        "the same, min_replicas=1 (WAIT 1 after each batch of acks)",
    ):
        assert figure in table, f"{figure!r} missing from:\n{table}"
    assert "failed" not in table
    assert "publish: pipelined XADD, 1,000 per batch" not in table  # the single-server rows
    assert "RESULTS.md not written" in done.stderr


@pytest.mark.slow
def test_bench_smoke_runs_the_flow_case() -> None:
    """`--cases flow` (run only when named: the drain with and without a rate limit that never
    binds, on the benchmark's redis-server and on a nats-server of its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--cases", "flow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    assert "## Flow control (smoke)" in table
    for case in ("Redis", "NATS"):
        for figure in (
            "drain, no limit: 1 worker process",
            "drain, rate limit that never binds",
            "CPU per event: worker, rate limit that never binds",
        ):
            assert f"| {case} | {figure}" in table, f"{case} {figure!r} missing from:\n{table}"
    assert "failed" not in table
    assert "publish: pipelined XADD, 1,000 per batch" not in table  # the single-server rows
    assert "RESULTS.md not written" in done.stderr


@pytest.mark.slow
def test_bench_ab_compares_a_revision_and_a_setting_in_one_run() -> None:
    """`python -m bench.ab`: the drain under each variant, one of them from a checkout of a
    git revision (a temporary worktree, removed afterwards)."""
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True)
    variants = ["before:rev=HEAD", "after", "off:OMNIDAEMON_TRACE_TTL=0,concurrency=4"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "-n", "300", "--reps", "1", *variants],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| before", "| after", "| off"]
    assert rows[1].split(" | ")[3] == "1.000"  # the first variant against itself
    after = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True)
    assert after.stdout == worktrees.stdout  # the revision's checkout is gone


def test_bench_ab_refuses_a_bad_variant_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "a:concurrency"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench.ab: 'a:concurrency': 'concurrency' is not KEY=VALUE"
    ]


def test_bench_instructions_refuses_bad_arguments_in_one_line() -> None:
    # Checked before anything starts (valgrind is not needed to be told).
    for argv, said in (
        (["a", "a"], "bench.instructions: variant names must differ"),
        (["a", "--n1", "5", "--n2", "2"], "bench.instructions: --n1 and --n2 must be 0 < n1 < n2"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bench.instructions", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [said]
