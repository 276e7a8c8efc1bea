"""The chaos run's short modes, run in CI: every kind of fault once, on one redis-server in
well under a minute (here), on a Redis Cluster with `min_replicas=1` in about 35 s
(`test_chaos_short_cluster.py`), and on one NATS JetStream server in well under a minute
(`test_chaos_short_nats.py`): one file each, so that the test runners share them out.

The full runs (`python -m tests.chaos`, 10 minutes, with and without `--cluster`) are in
docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos.checker import RunReport
from tests.chaos.run import FAULTS, run


def test_a_short_run_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    report = run(events=200, seconds=12.0, seed=1, folder=tmp_path)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in FAULTS), table
    assert report.publish_failed == 0, table  # no fault here lasts as long as publish_timeout
    assert_nothing_lost(report)


def assert_nothing_lost(report: RunReport) -> None:
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
