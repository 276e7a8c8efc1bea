"""The chaos run's short mode on a Redis Cluster (see `test_chaos_short.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.run import CLUSTER_FAULTS, run
from tests.chaos.test_chaos_short import assert_nothing_lost


@pytest.mark.slow
def test_a_short_cluster_run_with_every_fault_and_min_replicas_loses_nothing(
    tmp_path: Path,
) -> None:
    # Master kills and pauses fail over to replicas that confirmed every acknowledged write
    # (min_replicas=1): not even what the bus itself dropped may be above 0.
    report = run(events=300, seconds=30.0, seed=1, folder=tmp_path, cluster=True, min_replicas=1)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in CLUSTER_FAULTS), table
    assert not report.bus_loss_allowed
    assert_nothing_lost(report)
