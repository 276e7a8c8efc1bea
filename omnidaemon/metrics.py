"""Agent metrics: counted in each worker, summed for the whole fleet on the bus.

Each worker counts, per agent, what happens to the events it handles (`AgentMetrics`). The
counts travel to the bus with the batched acknowledgements (no extra round trip per event),
where every worker's increments land in one hash per agent; `omnidaemon metrics` and
`App.metrics` read them back as `AgentMetricsSnapshot`s. A worker started with
`--metrics-port` also exposes its own counts in the Prometheus text format.

What is counted, per agent:

- `received`: deliveries taken for handling (every attempt, including ones that could not be
  decoded).
- `succeeded`: handler runs that finished and whose outputs were written.
- `failed`: handler runs that raised, timed out or returned a value that does not match their
  annotation.
- `retried`: retries scheduled.
- `dead_lettered`: events moved to the dead-letter queue, whatever the reason.
- `duration`: a histogram of handler run times (seconds), successes and failures alike.
- `latency`: a histogram of end-to-end latency (seconds) of succeeded events, from the
  envelope's `created_at` to the end of the handler: queueing, retries and handling together.

In flight (handlers running now) is a gauge, not a count: it comes from the workers'
heartbeats.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUCKETS",
    "COUNTERS",
    "AgentMetrics",
    "AgentMetricsSnapshot",
    "HistogramSnapshot",
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
"""Upper bounds (seconds) of the histogram buckets; one more bucket holds everything above."""

COUNTERS: tuple[str, ...] = ("received", "succeeded", "failed", "retried", "dead_lettered")
"""The counters of every agent, in display order."""

_HISTOGRAMS = ("duration", "latency")
_NO_OBSERVATIONS = (0,) * (len(BUCKETS) + 1)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram of durations in seconds.

    Attributes:
        counts: Observations per bucket: `counts[i]` fell at or below `BUCKETS[i]` and above
            the bound before it; the last one holds everything above the largest bound.
        total: The sum of every observation, in seconds.
    """

    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many observations there are."""
        return sum(self.counts)

    @property
    def mean(self) -> float | None:
        """The mean observation in seconds, or `None` when there is none."""
        count = self.count
        return self.total / count if count else None

    def quantile(self, q: float) -> float | None:
        """An estimate of the `q` quantile (0 <= q <= 1) in seconds, or `None` when empty.

        Interpolated linearly within the bucket it falls in, like Prometheus's
        `histogram_quantile`; above the largest bound it answers that bound.
        """
        count = self.count
        if not count:
            return None
        rank = q * count
        seen = 0
        for index, in_bucket in enumerate(self.counts):
            if in_bucket and seen + in_bucket >= rank:
                if index == len(BUCKETS):
                    return BUCKETS[-1]
                lower = BUCKETS[index - 1] if index else 0.0
                upper = BUCKETS[index]
                return lower + (upper - lower) * max(0.0, rank - seen) / in_bucket
            seen += in_bucket
        return BUCKETS[-1]

    def cumulative(self) -> list[tuple[float, int]]:
        """`(upper bound, observations at or below it)` pairs, ending with `(inf, count)`."""
        pairs = []
        running = 0
        for bound, in_bucket in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += in_bucket
            pairs.append((bound, running))
        return pairs

    def to_json(self) -> dict[str, Any]:
        """The histogram as JSON data: count, sum, mean, p50, p90, p99 and the buckets."""
        return {
            "count": self.count,
            "sum": self.total,
            "mean": self.mean,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "buckets": {_bound_label(b): n for b, n in self.cumulative()},
        }

    @classmethod
    def empty(cls) -> HistogramSnapshot:
        """A histogram with no observations."""
        return cls(_NO_OBSERVATIONS, 0.0)


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


@dataclass(frozen=True, slots=True)
class AgentMetricsSnapshot:
    """An agent's metrics at one moment: of one worker, or summed over the fleet.

    Attributes:
        topic: The agent's topic.
        agent: The agent's name.
        received: Deliveries taken for handling.
        succeeded: Handler runs that succeeded.
        failed: Handler runs that failed.
        retried: Retries scheduled.
        dead_lettered: Events dead-lettered.
        in_flight: Handlers running now (from heartbeats; 0 when no worker runs).
        duration: Handler run times.
        latency: End-to-end latency of succeeded events.
    """

    topic: str
    agent: str
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    duration: HistogramSnapshot = HistogramSnapshot(_NO_OBSERVATIONS, 0.0)
    latency: HistogramSnapshot = HistogramSnapshot(_NO_OBSERVATIONS, 0.0)

    @classmethod
    def from_fields(
        cls, topic: str, agent: str, fields: Mapping[str, int], *, in_flight: int = 0
    ) -> AgentMetricsSnapshot:
        """Read the fields of an agent's metrics hash on the bus (see `AgentMetrics.delta`)."""
        histograms = {
            name: HistogramSnapshot(
                tuple(int(fields.get(f"{name}:{i}", 0)) for i in range(len(BUCKETS) + 1)),
                int(fields.get(f"{name}:sum_us", 0)) / 1_000_000,
            )
            for name in _HISTOGRAMS
        }
        return cls(
            topic,
            agent,
            received=int(fields.get("received", 0)),
            succeeded=int(fields.get("succeeded", 0)),
            failed=int(fields.get("failed", 0)),
            retried=int(fields.get("retried", 0)),
            dead_lettered=int(fields.get("dead_lettered", 0)),
            in_flight=in_flight,
            duration=histograms["duration"],
            latency=histograms["latency"],
        )

    def to_json(self) -> dict[str, Any]:
        """The snapshot as JSON data."""
        return {
            "topic": self.topic,
            "agent": self.agent,
            **{name: getattr(self, name) for name in COUNTERS},
            "in_flight": self.in_flight,
            "duration_seconds": self.duration.to_json(),
            "latency_seconds": self.latency.to_json(),
        }


class AgentMetrics:
    """One worker's running counts for one agent.

    Recording is a few integer additions, cheap enough for every event; `delta()` and
    `commit()` hand what has not reached the bus yet to the acknowledgement batcher, which
    writes it in the same round trip as a batch of acks.
    """

    __slots__ = (
        "_duration",
        "_duration_sum_us",
        "_latency",
        "_latency_sum_us",
        "_sent",
        "agent",
        "dead_lettered",
        "failed",
        "in_flight",
        "received",
        "retried",
        "succeeded",
        "topic",
    )

    def __init__(self, topic: str, agent: str) -> None:
        self.topic = topic
        self.agent = agent
        self.received = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.in_flight = 0
        self._duration = [0] * (len(BUCKETS) + 1)
        self._duration_sum_us = 0
        self._latency = [0] * (len(BUCKETS) + 1)
        self._latency_sum_us = 0
        self._sent: dict[str, int] = {}

    def observe_duration(self, seconds: float) -> None:
        """Record one handler run's duration."""
        self._duration[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._duration_sum_us += int(seconds * 1_000_000)

    def observe_latency(self, seconds: float) -> None:
        """Record one succeeded event's end-to-end latency."""
        seconds = max(0.0, seconds)  # clocks of different machines may disagree a little
        self._latency[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._latency_sum_us += int(seconds * 1_000_000)

    def _fields(self) -> dict[str, int]:
        fields = {name: getattr(self, name) for name in COUNTERS}
        for name, counts, sum_us in (
            ("duration", self._duration, self._duration_sum_us),
            ("latency", self._latency, self._latency_sum_us),
        ):
            for index, count in enumerate(counts):
                if count:
                    fields[f"{name}:{index}"] = count
            fields[f"{name}:sum_us"] = sum_us
        return fields

    def delta(self) -> dict[str, int]:
        """What changed since the last `commit`, as increments of the bus's fields."""
        sent = self._sent
        return {
            field: value - sent.get(field, 0)
            for field, value in self._fields().items()
            if value != sent.get(field, 0)
        }

    def commit(self, delta: Mapping[str, int]) -> None:
        """Mark `delta` (from `delta()`) as written to the bus."""
        sent = self._sent
        for field, increment in delta.items():
            sent[field] = sent.get(field, 0) + increment

    def snapshot(self) -> AgentMetricsSnapshot:
        """This worker's counts for the agent so far."""
        return AgentMetricsSnapshot.from_fields(
            self.topic, self.agent, self._fields(), in_flight=self.in_flight
        )
