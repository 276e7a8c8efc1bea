"""Duration histograms fine enough to trust: log-spaced buckets that add up across workers.

A histogram counts observations in buckets whose bounds grow by a constant ratio (60 per
decade, about 3.9 % apart), plus the coarse `BUCKETS` that the Prometheus exposition uses, so
that every coarse bucket is exactly a union of fine ones. Each bucket is one field of the
agent's metrics hash, written only when it changed, so hashes from every worker add up with
`HINCRBY`. The smallest and largest observation are kept beside the counts.

A quantile is answered from the bucket holding the observation of that rank: the point of the
bucket whose relative distance to both of its ends is the same, clamped to the smallest and
largest observation. For observations between `LOWEST` and `HIGHEST` seconds, the answer is
within `RELATIVE_ERROR` (relative) of the observation of rank `ceil(q * count)`, and never
outside [smallest, largest].
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUCKETS",
    "HIGHEST",
    "LOWEST",
    "RELATIVE_ERROR",
    "HistogramSnapshot",
    "bucket_field",
    "bucket_of",
]

BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Upper bounds (seconds) of the coarse buckets of `cumulative()` and of the Prometheus
exposition; one more holds everything above. The fine buckets split each of them."""

_PER_DECADE = 60
LOWEST = 1e-4
"""Below this many seconds (0.1 ms) quantiles are only known to be at most this."""
HIGHEST = 1e5
"""Above this many seconds (about 28 hours) quantiles are only known to be at most the largest
observation."""

# Rounded to 6 significant digits so that every worker, whatever its libm, computes the same
# bounds and the field names (which spell the bound) agree across machines.
_GRID = {
    float(f"{10 ** (k / _PER_DECADE):.6g}")
    for k in range(
        round(math.log10(LOWEST) * _PER_DECADE), round(math.log10(HIGHEST) * _PER_DECADE) + 1
    )
}
BOUNDS: tuple[float, ...] = tuple(sorted(_GRID | set(BUCKETS)))
"""Upper bounds (seconds) of the fine buckets; one more holds everything above."""

_GAMMA = max(high / low for low, high in itertools.pairwise(BOUNDS))
RELATIVE_ERROR: float = (_GAMMA - 1) / (_GAMMA + 1)
"""The largest relative error of a quantile (about 1.9 %), between `LOWEST` and `HIGHEST`."""

_FIELDS = (*(f":le{bound:.6g}" for bound in BOUNDS), ":le+Inf")
# Which coarse bucket each fine one belongs to (coarse bounds are fine bounds too: exact).
_COARSE = (*(bisect.bisect_left(BUCKETS, bound) for bound in BOUNDS), len(BUCKETS))
_OLD_FORMAT = (*(BOUNDS.index(bound) for bound in BUCKETS), len(BOUNDS))


def bucket_of(seconds: float) -> int:
    """The index of the fine bucket an observation of `seconds` falls in."""
    return bisect.bisect_left(BOUNDS, seconds)


def bucket_field(name: str, index: int) -> str:
    """The metrics hash field counting fine bucket `index` of histogram `name`."""
    return name + _FIELDS[index]


def read_buckets(name: str, fields: Mapping[str, int]) -> dict[int, int]:
    """Histogram `name`'s observations per fine bucket, from a metrics hash's fields.

    Fields `<name>:le<bound>` are fine buckets. Fields `<name>:<index>` were written by
    workers before issue 16 (coarse bucket `BUCKETS[index]`): they are counted in the fine
    bucket just below that coarse bound, so they read as they did then, at its upper end.
    """
    counts: dict[int, int] = {}
    fine, old = f"{name}:le", f"{name}:"
    for field, value in fields.items():
        if not value:
            continue
        if field.startswith(fine):
            bound = field[len(fine) :]
            index = len(BOUNDS) if bound == "+Inf" else bucket_of(float(bound))
        elif field.startswith(old) and field[len(old) :].isdigit():
            old_index = int(field[len(old) :])
            if old_index >= len(_OLD_FORMAT):
                continue  # not a bucket this version knows
            index = _OLD_FORMAT[old_index]
        else:
            continue
        counts[index] = counts.get(index, 0) + int(value)
    return counts


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram of durations in seconds.

    Attributes:
        counts: Observations per fine bucket (index into `BOUNDS`; `len(BOUNDS)` holds
            everything above the largest bound), only the buckets that hold any.
        total: The sum of every observation, in seconds.
        low: The smallest observation, or `None` when unknown (no observation, or only ones
            counted by workers older than issue 16).
        high: The largest observation, or `None` when unknown.
    """

    counts: Mapping[int, int]
    total: float
    low: float | None = None
    high: float | None = None

    @property
    def count(self) -> int:
        """How many observations there are."""
        return sum(self.counts.values())

    @property
    def mean(self) -> float | None:
        """The mean observation in seconds, or `None` when there is none."""
        count = self.count
        return self.total / count if count else None

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (0 <= q <= 1) in seconds, or `None` when empty.

        Within `RELATIVE_ERROR` of the observation of rank `ceil(q * count)` (the smallest for
        q = 0) and never outside the smallest and largest observation.
        """
        count = self.count
        if not count:
            return None
        # The small tolerance keeps 0.99 * 100 (= 99.00000000000001) at rank 99.
        rank = max(1, math.ceil(q * count - 1e-9))
        seen = 0
        index = len(BOUNDS)
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                break
        if index == len(BOUNDS):
            estimate = self.high if self.high is not None else BOUNDS[-1]
        elif index == 0:
            estimate = BOUNDS[0]
        else:
            lower, upper = BOUNDS[index - 1], BOUNDS[index]
            # Equally far, relatively, from both ends: the error is at most (r-1)/(r+1) for
            # a ratio r between bounds.
            estimate = 2 * lower * upper / (lower + upper)
        if self.high is not None:
            estimate = min(estimate, self.high)
        if self.low is not None:
            estimate = max(estimate, self.low)
        return estimate

    def cumulative(self) -> list[tuple[float, int]]:
        """`(coarse upper bound, observations at or below it)` pairs over `BUCKETS`, ending
        with `(inf, count)`: exact, since every fine bucket lies within one coarse bucket."""
        coarse = [0] * (len(BUCKETS) + 1)
        for index, in_bucket in self.counts.items():
            coarse[_COARSE[index]] += in_bucket
        pairs = []
        running = 0
        for bound, in_bucket in zip((*BUCKETS, float("inf")), coarse, strict=True):
            running += in_bucket
            pairs.append((bound, running))
        return pairs

    def to_json(self) -> dict[str, Any]:
        """The histogram as JSON data: count, sum, mean, min, max, p50, p90, p99 and the
        coarse cumulative buckets."""
        return {
            "count": self.count,
            "sum": self.total,
            "mean": self.mean,
            "min": self.low,
            "max": self.high,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "buckets": {_bound_label(b): n for b, n in self.cumulative()},
        }

    @classmethod
    def empty(cls) -> HistogramSnapshot:
        """A histogram with no observations."""
        return cls({}, 0.0)


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"
