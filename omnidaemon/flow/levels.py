"""The levels of an app's budgets, as a worker's Prometheus endpoint shows them.

A worker whose app declares budgets reads each budget's state from the bus once per heartbeat
interval (one small read per budget) and keeps its level, so that a scrape answers at once,
without a round trip: `omnidaemon_budget_level` and `omnidaemon_budget_capacity` in
`omnidaemon.observability.prometheus`. Every worker of an app reports the same budgets, each
as last read (at most one heartbeat interval old).
"""

from __future__ import annotations

from collections.abc import Mapping

import anyio

from omnidaemon.brokers.base import Broker
from omnidaemon.flow.gate import state_key
from omnidaemon.flow.limits import Budget
from omnidaemon.flow.state import bucket_level
from omnidaemon.observability.logging import get_logger

__all__ = ["BudgetLevels"]

_log = get_logger("omnidaemon.flow")


class BudgetLevels:
    """An app's budgets' levels, refreshed from the bus every `interval` seconds by `run`."""

    def __init__(self, broker: Broker, budgets: Mapping[str, Budget], interval: float) -> None:
        self._broker = broker
        self._budgets = dict(budgets)
        self._interval = interval
        self._levels: dict[str, float] = {}

    def gauges(self) -> dict[str, tuple[float, float]]:
        """Per budget read so far: `(level, capacity)`; a level below 0 is a debt."""
        return {name: (level, self._budgets[name].amount) for name, level in self._levels.items()}

    async def refresh(self) -> None:
        """Read every budget's state once."""
        for name, budget in self._budgets.items():
            data = await self._broker.get_value(state_key("budget", name))
            now = self._broker.clock()
            self._levels[name] = bucket_level(data, now, rate=budget.rate, capacity=budget.amount)

    async def run(self) -> None:
        """Refresh until cancelled; a bus that is away leaves the last levels in place."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                _log.debug("could not read the budgets' levels", error=repr(exc))
            await anyio.sleep(self._interval)
