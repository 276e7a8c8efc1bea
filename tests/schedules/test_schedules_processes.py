"""Schedules across worker processes on real buses: once per tick across the fleet, through a
SIGKILL, and the ticks of an outage on restart (the guarantee of docs/schedules.md).

Four scenarios run side by side, each in its own worker processes
(`tests/schedules/schedule_app_source.py`), which write one fsynced JSON line per step:

- On Redis, NATS JetStream and a Redis Cluster: three workers run an every-second schedule
  for `RUN_SECONDS` (14 s by default). Halfway, the worker running a tick's function (it
  holds the tick's claim; the function takes 0.3 s) is SIGKILLed, and a replacement starts.
  Every tick of the run must have been published exactly once: one event id per tick (an
  agent may see an event twice, at least once; a second *event* for a tick would be a
  double fire), no tick missing.
- On Redis: one worker runs two every-4-s schedules, one with `catch_up=True`; it stops,
  ticks fall due with no worker for longer than `GAP_AFTER` (a shorter pause is no outage),
  and a new worker comes up 1 s after the last of them: the earlier ones were missed
  (skipped), the last is owed (within the misfire grace: its period) and fires once,
  whatever `catch_up` says, and both go on from there. (`catch_up` itself, which only
  matters for periods over a minute, is tested in-process.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from omnidaemon.worker.schedule_state import GAP_AFTER
from tests.e2e._support import (
    WorkerProcess,
    buses_chosen,
    cli_env,
    read_lines,
    side_by_side,
    wait_for,
    write_module,
)
from tests.schedules.schedule_app_source import SOURCE

pytestmark = pytest.mark.slow

# How long the three workers of each bus run the every-second schedule (shorter for a quick
# look; longer for a soak: T_SCHEDULE_SECONDS=120).
RUN_SECONDS = float(os.environ.get("T_SCHEDULE_SECONDS", "14"))
STARTUP = 30.0  # seconds a worker may take to start (nine processes share two cores)
CATCH_UP_INTERVAL = 4.0
BACK_AFTER = 1.0  # the outage's new worker comes up this long after the owed tick


def _lines(log: Path, kind: str, schedule: str = "main") -> list[dict[str, Any]]:
    found = [json.loads(line) for line in read_lines(log)]
    return [f for f in found if f["kind"] == kind and f["schedule"] == schedule]


def _events_by_tick(log: Path, schedule: str = "main") -> dict[float, set[str]]:
    """The distinct events the agent received for each tick."""
    by_tick: dict[float, set[str]] = defaultdict(set)
    for line in _lines(log, "got", schedule):
        by_tick[line["tick"]].add(line["id"])
    return by_tick


def _started(worker: WorkerProcess) -> None:
    wait_for(lambda: worker.has_logged("worker started"), STARTUP, "a worker to start")


def _fleet(
    bus_url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess], after: threading.Event
) -> str:
    """Three workers, an every-second schedule, one SIGKILL: each tick fired exactly once.
    The workers are started once `after` is set (or `STARTUP` has gone by)."""
    tmp_path.mkdir()
    write_module(tmp_path, "sched_app", SOURCE)
    log, run = tmp_path / "ticks.jsonl", uuid.uuid4().hex[:8]
    env = cli_env(
        OMNIDAEMON_BROKER_URL=bus_url,
        T_APP=f"sched-{run}",
        T_TOPIC=f"sched.{run}",
        T_LOG=str(log),
        T_HOLD="0.3",
    )
    after.wait(STARTUP)
    workers = [spawn(["sched_app:app"], tmp_path, env) for _ in range(3)]
    for worker in workers:
        _started(worker)
    started = time.time()
    time.sleep(RUN_SECONDS / 2)  # the run's first half, undisturbed

    # SIGKILL the worker that is running a tick's function: it holds that tick's claim.
    mark = time.time()
    pids = {w.proc.pid: w for w in workers}
    holder = wait_for(
        lambda: next((f for f in _lines(log, "fn") if f["at"] > mark and f["pid"] in pids), None),
        10,
        "a tick's function to run",
    )
    pids[holder["pid"]].send(signal.SIGKILL)
    killed_at = time.time()
    _started(spawn(["sched_app:app"], tmp_path, env))
    time.sleep(max(0.0, started + RUN_SECONDS - time.time()))
    end = time.time()
    # The ticks up to the end are handled (a few seconds behind at most: a lease's takeover).
    wait_for(lambda: max(_events_by_tick(log), default=0) >= math.floor(end), 30, "the last ticks")

    by_tick = _events_by_tick(log)
    doubles = {tick: ids for tick, ids in by_tick.items() if len(ids) > 1}
    assert not doubles, f"ticks published more than once: {doubles}"
    window = range(math.ceil(started) + 1, math.floor(end))
    missing = [tick for tick in window if float(tick) not in by_tick]
    assert not missing, f"ticks never published: {missing}"
    assert holder["tick"] in by_tick  # the killed holder's tick was fired, once
    firers = {f["pid"] for f in _lines(log, "fn")}
    assert len(firers) >= 2, "the ticks are fired by whichever worker gets them"
    fired = {f["tick"]: f["at"] for f in _lines(log, "fn")}
    late = max(fired[t] - t for t in map(float, window) if t in fired)
    return (
        f"{len(window)} ticks in {end - started:.0f} s, each once; holder of tick "
        f"{holder['tick']:.0f} killed {killed_at - holder['tick']:.2f} s after it, fired by "
        f"{len(firers)} processes, latest fire {late:.2f} s after its tick"
    )


def _outage(
    bus_url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess], first_up: threading.Event
) -> str:
    """Ticks fall due while no worker runs, for longer than `GAP_AFTER`; a worker comes up
    `BACK_AFTER` after the last of them: the earlier ones were missed and are skipped, the
    last is owed and fires once, on the start (with either catch_up: the catch-up one would
    have fired it anyway)."""
    tmp_path.mkdir()
    write_module(tmp_path, "sched_app", SOURCE)
    log, run = tmp_path / "ticks.jsonl", uuid.uuid4().hex[:8]
    env = cli_env(
        OMNIDAEMON_BROKER_URL=bus_url,
        T_APP=f"catch-{run}",
        T_TOPIC=f"catch.{run}",
        T_LOG=str(log),
        T_SCHEDULES="up,skip",
        T_INTERVAL=str(CATCH_UP_INTERVAL),
    )
    first = spawn(["sched_app:app"], tmp_path, env)
    try:
        _started(first)
    finally:
        first_up.set()  # the fleets' workers start now

    def both_fired() -> float | None:
        up, skip = _events_by_tick(log, "up"), _events_by_tick(log, "skip")
        return max(set(up) & set(skip), default=None)

    wait_for(both_fired, CATCH_UP_INTERVAL + 10, "a tick of both schedules")
    first.send(signal.SIGTERM)
    first.wait_exit(30)
    stopped, step = time.time(), CATCH_UP_INTERVAL
    tick = both_fired() or 0.0  # the last tick the first worker fired
    # The owed tick: the first after the next one (so that at least one is missed) at least
    # GAP_AFTER after the stop: the worker, up BACK_AFTER later, ends a pause longer than
    # GAP_AFTER (the first worker's last watch stamp is at or before `stopped`).
    owed = tick + step * max(2, math.ceil((stopped + GAP_AFTER - tick) / step))
    # Spawned now, up at `owed + BACK_AFTER` (T_START_AT): however long Python takes to start.
    second = spawn(["sched_app:app"], tmp_path, {**env, "T_START_AT": str(owed + BACK_AFTER)})
    up_within = owed + BACK_AFTER - time.time() + STARTUP
    wait_for(lambda: second.has_logged("worker started"), up_within, "the worker to come up")
    after = owed + step
    wait_for(lambda: (both_fired() or 0) >= after, step + 15, "the next tick")

    up, skip = _events_by_tick(log, "up"), _events_by_tick(log, "skip")
    skipped = {tick + n * step for n in range(1, round((owed - tick) / step))}
    assert all(len(ids) == 1 for ids in [*up.values(), *skip.values()])
    assert not skipped & set(up) and owed in up and after in up  # the later one
    assert not skipped & set(skip) and owed in skip and after in skip  # owed too
    assert second.has_logged("schedule missed ticks")
    late = next(f["at"] for f in _lines(log, "fn", "skip") if f["tick"] == owed)
    return f"{len(skipped)} ticks skipped; owed tick fired {late - owed:.1f} s late, once"


def test_schedules_fire_once_per_tick_across_worker_processes(
    request: pytest.FixtureRequest, tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    # The buses (and the outage run) side by side: the schedules keep them mostly idle. The
    # outage's first worker starts before the fleets' nine: started among them, it took 14 s of
    # the two cores, and the outage, which then waits out GAP_AFTER, was the longest run.
    outage_up = threading.Event()
    urls = buses_chosen(request, "T_SCHEDULE_BUSES")  # T_SCHEDULE_BUSES=redis runs one
    runs = {
        name: partial(_fleet, url, tmp_path / name, spawn, outage_up) for name, url in urls.items()
    }
    runs["outage"] = partial(
        _outage, request.getfixturevalue("redis_url"), tmp_path / "outage", spawn, outage_up
    )
    side_by_side(runs)
