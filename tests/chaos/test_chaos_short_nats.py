"""The chaos run's short mode on one NATS JetStream server (see `test_chaos_short.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.run import run
from tests.chaos.test_chaos_short import assert_nothing_lost


@pytest.mark.slow
def test_a_short_nats_run_with_every_fault_loses_nothing(tmp_path: Path) -> None:
    from tests.chaos.nats_faults import NATS_FAULTS  # the NATS client only where it is used

    report = run(events=200, seconds=12.0, seed=1, folder=tmp_path, nats=True)
    table = report.table()
    assert all(report.faults[kind] >= 1 for kind in NATS_FAULTS), table
    # The publisher goes through the proxy too, but no fault lasts as long as publish_timeout.
    assert report.publish_failed == 0, table
    assert_nothing_lost(report)
