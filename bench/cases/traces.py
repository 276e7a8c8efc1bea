"""Run traces (`--cases traces`): what recording every attempt costs a draining worker.

The omnidaemon drain of `bench.cases.omni` (Redis, one worker process at the default
concurrency) twice in the same run on the same server: with traces, as a worker runs by
default, and with `OMNIDAEMON_TRACE_TTL=0`, which turns them off. With traces the worker
keeps a record for each attempt (`omnidaemon.traces.records.TraceBook`) and writes them with
its batched acks: one JSON document and one script per batch
(`omnidaemon/brokers/redis/_traces.py`) filing it under every run it holds, and the batch's
entry in the index of runs. The raw redis-py drain of
`bench.cases.raw` runs in the same repetition, for the ratios. After each omnidaemon drain
the benchmark checks the runs on the bus: every event's run there with traces, none without.
redis-server runs on one CPU and the drains on the others (`pin`), so that the scheduler's
placement does not swamp the few per cent measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.cases import omni, raw
from bench.common import BenchError, Children, Config, RedisServer
from omnidaemon.brokers.redis import RedisBroker

OFF = {"OMNIDAEMON_TRACE_TTL": "0"}
VARIANTS = {"with": "", "without": "_off"}
"""The drains measured, and the suffix of their figures' names."""


def pin(server: RedisServer) -> set[int] | None:
    """Keep redis-server on the first CPU and this process, and the workers and consumers
    it starts from now on, on the others; returns this process's CPUs before, to `unpin`.

    Two drains compared within a few per cent must not differ by where the scheduler put
    the worker: sharing a CPU with redis-server, a drain runs at half its rate. Nothing is
    pinned on a machine with one CPU, or where affinity cannot be set.
    """
    if not hasattr(os, "sched_setaffinity") or server.process is None:
        return None
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        return None
    first, *rest = sorted(cpus)
    os.sched_setaffinity(server.process.pid, {first})
    os.sched_setaffinity(0, set(rest))
    return cpus


def unpin(cpus: set[int] | None) -> None:
    """Undo `pin` for this process (redis-server stays where it is)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _runs_indexed(server: RedisServer) -> int:
    """How many runs have a trace on the bus: the runs filed in the trace directories
    (`omni:{trace-0}:dir:*` hashes, run -> its batches, found by a scan of the keyspace,
    which after a drain holds little else)."""
    pattern = RedisBroker(server.url).trace_dir_key(0, 0, 0).replace(":0:0", ":*")
    with server.client() as r:
        return sum(int(r.hlen(key)) for key in r.scan_iter(match=pattern, count=10_000))


def _check(server: RedisServer, n: int, traced: bool) -> None:
    """`BenchError` unless the drain just measured did (or did not) write its N runs' traces:
    each drained event starts a run of its own (no correlation id)."""
    runs = _runs_indexed(server)
    expected = n if traced else 0
    if runs != expected:
        said = "with" if traced else "without"
        raise BenchError(f"after the drain {said} traces: {runs} runs indexed, not {expected}")


def raw_drain(server: RedisServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """The raw redis-py drain (`raw.drain`), under this case's names."""
    result = raw.drain(server, children, cfg, out)
    return {f"traces.{key}": value for key, value in result.items()}


def omni_drain(
    server: RedisServer, children: Children, cfg: Config, out: Path, *, variant: str
) -> dict[str, float]:
    """The omnidaemon drain (`omni.drain`) with traces (`variant="with"`) or without."""
    traced = variant == "with"
    result = omni.drain(server, children, cfg, out, n=cfg.n, env=None if traced else OFF)
    _check(server, cfg.n, traced)
    name = f"traces.drain{VARIANTS[variant]}"
    cpu = result.get("cpu")
    return {name: result["rate"]} | ({f"{name}_cpu": cpu} if cpu is not None else {})
