"""Rates for the overview's small charts: the fleet's counts sampled as pages ask for them.

The bus keeps each agent's counts as running totals (summed over workers); a rate is the
difference of two readings over the time between them. The API process keeps the last
readings in memory, taken when the overview (or its live part) is served, at most one a
second: nothing is read from the bus while nobody looks, and every viewer shares them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from omnidaemon.metrics import AgentMetricsSnapshot

__all__ = ["COUNTS", "RateHistory", "Sparkline", "sparkline"]

COUNTS = ("received", "succeeded", "failed", "dead_lettered")
"""The counts charted, each as a rate per second."""

_KEEP = 120  # readings kept: two minutes at one a second
_MIN_GAP = 1.0  # seconds between readings kept


@dataclass(frozen=True, slots=True)
class Sparkline:
    """A small line chart's data: its SVG polyline points, its latest and highest values."""

    points: str
    latest: float
    peak: float


class RateHistory:
    """Readings of every agent's running totals, and the rates between them."""

    def __init__(self) -> None:
        self._readings: deque[tuple[float, dict[tuple[str, str], tuple[int, ...]]]] = deque(
            maxlen=_KEEP
        )

    def record(self, snapshots: Iterable[AgentMetricsSnapshot], now: float | None = None) -> None:
        """Keep a reading of `snapshots` (dropped if the last one is under a second old)."""
        at = time.monotonic() if now is None else now
        if self._readings and at - self._readings[-1][0] < _MIN_GAP:
            return
        totals = {(s.topic, s.agent): tuple(getattr(s, name) for name in COUNTS) for s in snapshots}
        self._readings.append((at, totals))

    def rates(self, topic: str, agent: str) -> dict[str, list[float]]:
        """Per count, its rate per second between each pair of readings, oldest first (a
        total that went down, as when a worker's counts expire, reads as 0)."""
        series: dict[str, list[float]] = {name: [] for name in COUNTS}
        key = (topic, agent)
        previous: tuple[float, tuple[int, ...]] | None = None
        for at, totals in self._readings:
            counts = totals.get(key)
            if counts is None:
                previous = None
                continue
            if previous is not None and at > previous[0]:
                gap = at - previous[0]
                for name, now_count, then_count in zip(COUNTS, counts, previous[1], strict=True):
                    series[name].append(max(0, now_count - then_count) / gap)
            previous = (at, counts)
        return series


def sparkline(values: Sequence[float], *, width: int = 120, height: int = 28) -> Sparkline:
    """The points of a line chart of `values` in a `width` x `height` box (the highest value
    at the top; a flat line at the bottom when all are 0)."""
    if not values:
        return Sparkline("", 0.0, 0.0)
    peak = max(values)
    scale = (height - 2) / peak if peak > 0 else 0.0
    step = width / max(1, len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - value * scale:.1f}" for i, value in enumerate(values)
    )
    if len(values) == 1:
        points += f" {width:.1f},{height - 1 - values[0] * scale:.1f}"
    return Sparkline(points, values[-1], peak)
