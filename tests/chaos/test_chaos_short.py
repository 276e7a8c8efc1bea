"""The chaos run's short modes, run in CI: every kind of fault once, on one redis-server in
well under a minute, on a Redis Cluster (with `min_replicas=1`) in about a minute, and on one
NATS JetStream server in well under a minute.

The full runs (`python -m tests.chaos`, 10 minutes, with and without `--cluster`) are in
docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.checker import RunReport
from tests.chaos.run import CLUSTER_FAULTS, FAULTS, run


def test_a_short_run_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    report = run(events=200, seconds=12.0, seed=1, folder=tmp_path)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in FAULTS), table
    assert report.publish_failed == 0, table  # no fault here lasts as long as publish_timeout
    _assert_nothing_lost(report)


@pytest.mark.slow
def test_a_short_cluster_run_with_every_fault_and_min_replicas_loses_nothing(
    tmp_path: Path,
) -> None:
    # Master kills and pauses fail over to replicas that confirmed every acknowledged write
    # (min_replicas=1): not even what the bus itself dropped may be above 0.
    report = run(events=400, seconds=40.0, seed=1, folder=tmp_path, cluster=True, min_replicas=1)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in CLUSTER_FAULTS), table
    assert not report.bus_loss_allowed
    _assert_nothing_lost(report)


@pytest.mark.slow
def test_a_short_nats_run_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    from tests.chaos.nats_faults import NATS_FAULTS  # the NATS client only where it is used

    report = run(events=200, seconds=12.0, seed=1, folder=tmp_path, nats=True)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in NATS_FAULTS), table
    # The publisher goes through the proxy too, but no fault lasts as long as publish_timeout.
    assert report.publish_failed == 0, table
    _assert_nothing_lost(report)


def _assert_nothing_lost(report: RunReport) -> None:
    table = report.table()
    assert report.publish_errors == {}, table  # a failed publish raises BusUnavailable
    assert report.ok, table
    for agent in report.agents:
        assert agent.lost == [], table
        assert agent.lost_by_bus == [], table
        # Every ordinary event acknowledged by the bus was handled to the end by this agent.
        parked = sum(agent.ordinary_dead_lettered.values())  # died with their workers
        assert agent.processed + parked == report.published - agent.poison_total, table
        assert agent.poison_total >= 2, table
        assert agent.poison_dead_lettered == agent.poison_total, table
        assert agent.poison_wrong == [], table
        assert agent.garbage_dead_lettered == agent.garbage_total >= 1, table
