"""Flow control that never binds (`--cases flow`): what asking the bus before each start costs.

The omnidaemon drain of `bench.cases.omni` (Redis) and `bench.cases.nats` (NATS JetStream),
one worker process at the default concurrency, twice in the same run on the same server: the
agent as it is, and the same agent with `rate_limit=NEVER_BINDS` (`bench.apps`: a million
starts a second, a burst of a million), which no event ever waits for. The difference is the
admission itself: before each handler starts, the worker reads the limit's state on the bus
and writes it back with a compare-and-set (`omnidaemon.flow.gate`), one change of a key at a
time per worker. After each drain the benchmark checks the limit's state on the bus: present
with the limit, absent without.

A third drain measures priorities in use: the topic's lanes marked as used (as a publisher
does before its first high or low event), so the worker reads the empty high lane before the
normal one on every fetch (`omnidaemon.worker.lanes`), and waits on all three lanes when idle.
Every event is in the normal lane: the difference is what serving lanes costs a topic whose
traffic is all of one priority.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.cases import nats, omni
from bench.common import BenchError, Children, Config, NatsServer, RedisServer
from omnidaemon.brokers import open_broker
from omnidaemon.flow.gate import state_key
from omnidaemon.lanes import LANES_MARK_TTL, lanes_mark_key

LIMITED = {"OMNI_BENCH_RATE_LIMIT": "never-binds"}
AGENT = "sink_0"  # the drain app's agent


async def _limit_state(url: str) -> bytes | None:
    broker = open_broker(url)
    await broker.connect()
    try:
        return await broker.get_value(state_key("rate", AGENT))
    finally:
        await broker.close()


def _check(url: str, limited: bool) -> None:
    """`BenchError` unless the drain just measured did (or did not) go through the limit."""
    kept = asyncio.run(_limit_state(url)) is not None
    if kept != limited:
        said = "no rate limit state on the bus" if limited else "a rate limit's state on the bus"
        raise BenchError(f"after the drain {'with' if limited else 'without'} a limit: {said}")


async def _mark(url: str) -> None:
    broker = open_broker(url)
    await broker.connect()
    try:
        await broker.set_value(lanes_mark_key(omni.TOPIC), b"1", LANES_MARK_TTL)
    finally:
        await broker.close()


def _figures(prefix: str, variant: str, rate: float, cpu: float | None) -> dict[str, float]:
    name = f"{prefix}.drain{VARIANTS[variant]}"
    return {name: rate} | ({f"{name}_cpu": cpu} if cpu is not None else {})


VARIANTS = {"plain": "", "limited": "_limited", "lanes": "_lanes"}
"""The drains measured, and the suffix of their figures' names."""


def redis_drain(
    server: RedisServer, children: Children, cfg: Config, out: Path, *, variant: str
) -> dict[str, float]:
    """The Redis drain (`omni.drain`): plain, with the limit that never binds, or with the
    topic's lanes in use."""
    limited = variant == "limited"
    result = omni.drain(
        server,
        children,
        cfg,
        out,
        n=cfg.n,
        env=LIMITED if limited else None,
        setup=(lambda: asyncio.run(_mark(server.url))) if variant == "lanes" else None,
    )
    _check(server.url, limited)
    return _figures("flow", variant, result["rate"], result.get("cpu"))


def nats_drain(
    server: NatsServer, children: Children, cfg: Config, out: Path, *, variant: str
) -> dict[str, float]:
    """The NATS drain (`nats.omni_drain`), as `redis_drain`."""
    limited = variant == "limited"
    result = nats.omni_drain(
        server,
        children,
        cfg,
        out,
        env=LIMITED if limited else None,
        setup=(lambda: asyncio.run(_mark(server.url))) if variant == "lanes" else None,
    )
    _check(server.url, limited)
    return _figures(
        "flow.nats", variant, result["nats.omni.drain"], result.get("nats.omni.drain_cpu")
    )
