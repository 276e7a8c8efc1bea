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
- `duration`: a histogram of handler run times (seconds), successes and failures alike. Its
  quantiles are within `RELATIVE_ERROR` (1.92 %) of a real observation from 0.1 ms to about a
  day, and never outside the smallest and largest (see `omnidaemon._histogram`).
- `latency`: a histogram of end-to-end latency (seconds) of succeeded events, from the
  envelope's `created_at` to the end of the handler: queueing, retries and handling together.
- `throttled`: times an event was put back on the bus by flow control (a rate limit, budget
  or key's concurrency refused it for now; see `omnidaemon.flow`).
- `expired`: events dead-lettered as `Expired` because they were not started in time.
- `cancelled`: events settled as cancelled (`App.cancel`): never started, or stopped while
  they ran.
- `wait`: a histogram of the time events that flow control held back waited (seconds), from
  their first refusal to their start.

In flight (handlers running now) is a gauge, not a count: it comes from the workers'
heartbeats.
"""

from __future__ import annotations

from bisect import bisect_left as _bucket_of
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omnidaemon._histogram import (
    BOUNDS,
    BUCKETS,
    RELATIVE_ERROR,
    HistogramSnapshot,
    bucket_field,
    read_buckets,
)

__all__ = [
    "BUCKETS",
    "COUNTERS",
    "RELATIVE_ERROR",
    "AgentMetrics",
    "AgentMetricsSnapshot",
    "HistogramSnapshot",
    "is_extreme",
]


def is_extreme(field_name: str) -> bool:
    """Whether a metrics hash field keeps an extreme instead of summing increments.

    `<histogram>:max_us` keeps the largest value ever written, `<histogram>:min_us` the
    smallest; every other field is a sum (`HINCRBY`).
    """
    return field_name.endswith((":max_us", ":min_us"))


COUNTERS: tuple[str, ...] = (
    "received",
    "succeeded",
    "failed",
    "retried",
    "dead_lettered",
    "throttled",
    "expired",
    "cancelled",
)
"""The counters of every agent, in display order."""

_HISTOGRAMS = ("duration", "latency", "wait")
_NO_LOW = 1 << 62  # above any duration in microseconds: "no observation yet"


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
        throttled: Times flow control put an event back on the bus to wait.
        expired: Events dead-lettered as `Expired`, unrun.
        cancelled: Events settled as cancelled (`App.cancel`).
        in_flight: Handlers running now (from heartbeats; 0 when no worker runs).
        duration: Handler run times.
        latency: End-to-end latency of succeeded events.
        wait: How long events held back by flow control waited before they started.
    """

    topic: str
    agent: str
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    throttled: int = 0
    expired: int = 0
    cancelled: int = 0
    in_flight: int = 0
    duration: HistogramSnapshot = field(default_factory=HistogramSnapshot.empty)
    latency: HistogramSnapshot = field(default_factory=HistogramSnapshot.empty)
    wait: HistogramSnapshot = field(default_factory=HistogramSnapshot.empty)

    @classmethod
    def from_fields(
        cls, topic: str, agent: str, fields: Mapping[str, int], *, in_flight: int = 0
    ) -> AgentMetricsSnapshot:
        """Read the fields of an agent's metrics hash on the bus (see `AgentMetrics.delta`)."""
        histograms = {name: _read_histogram(name, fields) for name in _HISTOGRAMS}
        return cls(
            topic,
            agent,
            received=int(fields.get("received", 0)),
            succeeded=int(fields.get("succeeded", 0)),
            failed=int(fields.get("failed", 0)),
            retried=int(fields.get("retried", 0)),
            dead_lettered=int(fields.get("dead_lettered", 0)),
            throttled=int(fields.get("throttled", 0)),
            expired=int(fields.get("expired", 0)),
            cancelled=int(fields.get("cancelled", 0)),
            in_flight=in_flight,
            duration=histograms["duration"],
            latency=histograms["latency"],
            wait=histograms["wait"],
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
            "wait_seconds": self.wait.to_json(),
        }


def _read_histogram(name: str, fields: Mapping[str, int]) -> HistogramSnapshot:
    counts = read_buckets(name, fields)
    low = fields.get(f"{name}:min_us")
    high = fields.get(f"{name}:max_us")
    return HistogramSnapshot(
        counts,
        int(fields.get(f"{name}:sum_us", 0)) / 1_000_000,
        low=int(low) / 1_000_000 if counts and low is not None else None,
        high=int(high) / 1_000_000 if counts and high is not None else None,
    )


class AgentMetrics:
    """One worker's running counts for one agent.

    Recording is a few integer operations, cheap enough for every event; `delta()` and
    `commit()` hand what has not reached the bus yet to the acknowledgement batcher, which
    writes it in the same round trip as a batch of acks.
    """

    __slots__ = (
        "_duration",
        "_duration_high_us",
        "_duration_low_us",
        "_duration_sum_us",
        "_latency",
        "_latency_high_us",
        "_latency_low_us",
        "_latency_sum_us",
        "_sent",
        "_wait",
        "_wait_high_us",
        "_wait_low_us",
        "_wait_sum_us",
        "agent",
        "cancelled",
        "dead_lettered",
        "expired",
        "failed",
        "in_flight",
        "received",
        "retried",
        "succeeded",
        "throttled",
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
        self.throttled = 0
        self.expired = 0
        self.cancelled = 0
        self.in_flight = 0
        self._duration = [0] * (len(BOUNDS) + 1)
        self._duration_sum_us = 0
        self._duration_low_us = _NO_LOW
        self._duration_high_us = -1
        self._latency = [0] * (len(BOUNDS) + 1)
        self._latency_sum_us = 0
        self._latency_low_us = _NO_LOW
        self._latency_high_us = -1
        self._wait = [0] * (len(BOUNDS) + 1)
        self._wait_sum_us = 0
        self._wait_low_us = _NO_LOW
        self._wait_high_us = -1
        self._sent: dict[str, int] = {}

    def observe_duration(self, seconds: float) -> None:
        """Record one handler run's duration."""
        self._duration[_bucket_of(BOUNDS, seconds)] += 1  # bisect, called inline: hot path
        us = int(seconds * 1_000_000)
        self._duration_sum_us += us
        # Truncated to whole microseconds: the kept largest never exceeds the true one.
        if us > self._duration_high_us:
            self._duration_high_us = us
        if us < self._duration_low_us:
            self._duration_low_us = us

    def observe_latency(self, seconds: float) -> None:
        """Record one succeeded event's end-to-end latency."""
        seconds = max(0.0, seconds)  # clocks of different machines may disagree a little
        self._latency[_bucket_of(BOUNDS, seconds)] += 1
        us = int(seconds * 1_000_000)
        self._latency_sum_us += us
        if us > self._latency_high_us:
            self._latency_high_us = us
        if us < self._latency_low_us:
            self._latency_low_us = us

    def observe_wait(self, seconds: float) -> None:
        """Record how long an event held back by flow control waited before it started."""
        seconds = max(0.0, seconds)
        self._wait[_bucket_of(BOUNDS, seconds)] += 1
        us = int(seconds * 1_000_000)
        self._wait_sum_us += us
        self._wait_high_us = max(self._wait_high_us, us)
        self._wait_low_us = min(self._wait_low_us, us)

    def _fields(self) -> dict[str, int]:
        fields = {name: getattr(self, name) for name in COUNTERS}
        for name, counts, sum_us, low_us, high_us in (
            (
                "duration",
                self._duration,
                self._duration_sum_us,
                self._duration_low_us,
                self._duration_high_us,
            ),
            (
                "latency",
                self._latency,
                self._latency_sum_us,
                self._latency_low_us,
                self._latency_high_us,
            ),
            ("wait", self._wait, self._wait_sum_us, self._wait_low_us, self._wait_high_us),
        ):
            for index, count in enumerate(counts):
                if count:
                    fields[bucket_field(name, index)] = count
            fields[f"{name}:sum_us"] = sum_us
            if high_us >= 0:
                fields[f"{name}:min_us"] = low_us
                fields[f"{name}:max_us"] = high_us
        return fields

    def delta(self) -> dict[str, int]:
        """What changed since the last `commit`: increments of the bus's sums, and the
        extremes (see `is_extreme`) that changed, as values."""
        sent = self._sent
        delta = {}
        for name, value in self._fields().items():
            if is_extreme(name):
                if value != sent.get(name):
                    delta[name] = value
            elif value != sent.get(name, 0):
                delta[name] = value - sent.get(name, 0)
        return delta

    def commit(self, delta: Mapping[str, int]) -> None:
        """Mark `delta` (from `delta()`) as written to the bus."""
        sent = self._sent
        for name, value in delta.items():
            sent[name] = value if is_extreme(name) else sent.get(name, 0) + value

    def snapshot(self) -> AgentMetricsSnapshot:
        """This worker's counts for the agent so far."""
        return AgentMetricsSnapshot.from_fields(
            self.topic, self.agent, self._fields(), in_flight=self.in_flight
        )
