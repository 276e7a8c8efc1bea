"""Flow control that never binds (`--cases flow`): what asking the bus before each start costs.

The omnidaemon drain of `bench.cases.omni` (Redis) and `bench.cases.nats` (NATS JetStream),
one worker process at the default concurrency, twice in the same run on the same server: the
agent as it is, and the same agent with `rate_limit=NEVER_BINDS` (`bench.apps`: a million
starts a second, a burst of a million), which no event ever waits for. The difference is the
admission itself: before each handler starts, the worker reads the limit's state on the bus
and writes it back with a compare-and-set (`omnidaemon.flow.gate`), one change of a key at a
time per worker. After each drain the benchmark checks the limit's state on the bus: present
with the limit, absent without.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.cases import nats, omni
from bench.common import BenchError, Children, Config, NatsServer, RedisServer
from omnidaemon.brokers import open_broker
from omnidaemon.flow.gate import state_key

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


def _figures(prefix: str, limited: bool, rate: float, cpu: float | None) -> dict[str, float]:
    name = f"{prefix}.drain_limited" if limited else f"{prefix}.drain"
    return {name: rate} | ({f"{name}_cpu": cpu} if cpu is not None else {})


def redis_drain(
    server: RedisServer, children: Children, cfg: Config, out: Path, *, limited: bool
) -> dict[str, float]:
    """The Redis drain (`omni.drain`), with or without the limit that never binds."""
    result = omni.drain(server, children, cfg, out, n=cfg.n, env=LIMITED if limited else None)
    _check(server.url, limited)
    return _figures("flow", limited, result["rate"], result.get("cpu"))


def nats_drain(
    server: NatsServer, children: Children, cfg: Config, out: Path, *, limited: bool
) -> dict[str, float]:
    """The NATS drain (`nats.omni_drain`), with or without the limit that never binds."""
    result = nats.omni_drain(server, children, cfg, out, env=LIMITED if limited else None)
    _check(server.url, limited)
    return _figures(
        "flow.nats", limited, result["nats.omni.drain"], result.get("nats.omni.drain_cpu")
    )
