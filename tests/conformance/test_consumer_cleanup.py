"""Consumers leave their groups (issue 14, item 13), proven with real worker processes.

A gracefully stopped worker removes its consumer from its agents' groups; the consumer of a
killed one is removed by a live worker once its deliveries were taken over. Without this, every
restart left one more consumer in every group of the bus. The workers and their app are those
of `test_worker_processes.py`, on each broker's bus; the consumers are the ones the bus lists
(`describe(consumers=True)`, as `omnidaemon bus stats` shows them).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from omnidaemon.brokers import Broker
from tests.conformance.test_worker_processes import (
    BLOCKING_AGENT,
    BROKER_BUSES,
    BUSES,
    SETTLE,
    Fleet,
    _make_fleet,
)
from tests.e2e._support import spawn_workers, wait_for

pytestmark = pytest.mark.slow

# A killed worker's consumer goes once it has been idle for the prune threshold, which for
# these agents (reclaim_idle=1 s) is its 10 s floor, after its delivery was taken over.
PRUNED = 20.0


@pytest.fixture(params=BROKER_BUSES)
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    spawning = spawn_workers()
    f = _make_fleet(BUSES[request.param](request), tmp_path, next(spawning))
    try:
        yield f
    finally:
        f.close()
        spawning.close()  # kills the workers still running


def consumers(fleet: Fleet, group: str = "work") -> list[str]:
    """The consumers the bus lists for `group` (on Redis: of the topic and the retry stream)."""

    async def names(bus: Broker) -> list[str]:
        info = await bus.describe(fleet.topic, consumers=True)
        found = [g for g in info.groups if g.group == group] if info else []
        return sorted({c.name for g in found for c in g.consumer_details})

    return fleet.call(names)


def test_graceful_restarts_leave_no_consumer_behind(fleet: Fleet) -> None:
    fleet.write_app(BLOCKING_AGENT)
    for n in range(3):
        worker = fleet.start_ready()
        key = f"e{n}"
        fleet.publish([{"k": key}])
        wait_for(
            lambda key=key: fleet.done_counts()[key] == 1 and fleet.pending("work") == 0,
            SETTLE,
            "the event to be handled",
        )
        assert len(consumers(fleet)) == 1  # the running worker's
        worker.send(signal.SIGTERM)
        status, _ = worker.wait_exit(timeout=SETTLE)
        assert status == 0, worker.stderr
        assert consumers(fleet) == [], f"restart {n + 1} left its consumer in the group"


def test_a_killed_workers_consumer_is_removed_once_its_delivery_is_taken_over(
    fleet: Fleet,
) -> None:
    """A killed worker's consumer is removed once its delivery was taken over (and its
    heartbeat is gone); the live workers keep running."""
    release = fleet.cwd / "release"
    fleet.env["T_RELEASE"] = str(release)
    fleet.env["OMNIDAEMON_HEARTBEAT_INTERVAL"] = "1"  # a dead worker's heartbeat goes in 3 s
    fleet.write_app(BLOCKING_AGENT)
    victim = fleet.start_ready()
    fleet.publish([{"k": "held", "block": True}])
    wait_for(
        lambda: any(s.key == "held" for s in fleet.steps("start")),
        SETTLE,
        "the blocking handler to start",
    )
    [dead] = consumers(fleet)
    survivor = fleet.start_ready()

    victim.send(signal.SIGKILL)
    victim.wait_exit(timeout=5)
    release.touch()
    wait_for(
        lambda: fleet.done_counts()["held"] == 1 and fleet.pending("work") == 0,
        SETTLE,
        "the survivor to take the event over and finish it",
    )
    wait_for(lambda: dead not in consumers(fleet), PRUNED, "the dead consumer to be removed")
    assert consumers(fleet), "the survivor's consumer was removed with the dead one"
    assert survivor.proc.poll() is None
    assert survivor.has_logged("removed consumers of stopped workers"), survivor.stderr
