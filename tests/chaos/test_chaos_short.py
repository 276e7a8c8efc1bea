"""The chaos run's short mode, run in CI: every kind of fault once, in well under a minute.

The full run (`python -m tests.chaos`, 10 minutes) is in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos.run import FAULTS, run


def test_a_short_run_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    report = run(events=200, seconds=12.0, seed=1, folder=tmp_path)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in FAULTS), table
    assert report.publish_failed == 0, table  # no fault here lasts as long as publish_timeout
    for agent in report.agents:
        assert agent.lost == [], table
        # Every ordinary event acknowledged by the bus was handled to the end by this agent.
        parked = sum(agent.ordinary_dead_lettered.values())  # died with their workers
        assert agent.processed + parked == report.published - agent.poison_total, table
        assert agent.poison_total >= 2, table
        assert agent.poison_dead_lettered == agent.poison_total, table
        assert agent.poison_wrong == [], table
        assert agent.garbage_dead_lettered == agent.garbage_total >= 1, table
