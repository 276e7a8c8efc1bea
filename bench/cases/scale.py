"""Scale: one agent drained by 1, 2 and 4 worker processes (`worker --processes N`), and one
topic fanned out to 1, 4 and 16 agents in one worker process, with that process's CPU time per
event (read with `time.process_time()` inside the worker at its first and its last handler
call, so start-up and shutdown are not counted)."""

from __future__ import annotations

from pathlib import Path

from bench.cases import omni
from bench.common import Children, Config, RedisServer


def processes(
    server: RedisServer, children: Children, cfg: Config, out: Path, count: int
) -> dict[str, float]:
    result = omni.drain(server, children, cfg, out, n=cfg.n, processes=count)
    return {f"scale.p{count}": result["rate"]}


def fanout(
    server: RedisServer, children: Children, cfg: Config, out: Path, agents: int
) -> dict[str, float]:
    result = omni.drain(server, children, cfg, out, n=cfg.n, fanout=agents)
    return {f"fanout.k{agents}": result["rate"], f"fanout.k{agents}_cpu": result["cpu"]}
