"""What a worker's metrics look like to Prometheus: its per-agent counts in the text format.

`render_prometheus` turns a worker's `AgentMetricsSnapshot`s into the exposition that
`omnidaemon.observability.exporter` serves on `/metrics`.

The metrics, each labelled `app`, `topic` and `agent` (see `omnidaemon.metrics` for what is
counted):

- `omnidaemon_events_received_total`, `omnidaemon_events_succeeded_total`,
  `omnidaemon_events_failed_total`, `omnidaemon_events_retried_total`,
  `omnidaemon_events_dead_lettered_total`, `omnidaemon_events_throttled_total`,
  `omnidaemon_events_expired_total`, `omnidaemon_events_cancelled_total`: counters.
- `omnidaemon_events_in_flight`: a gauge, the handlers running now.
- `omnidaemon_handler_duration_seconds`: a histogram of handler run times.
- `omnidaemon_event_latency_seconds`: a histogram of end-to-end latency of succeeded events.

plus `omnidaemon_worker_info{worker, app, version}`, always 1, to tell workers apart, and,
when the app declares budgets, `omnidaemon_budget_level{app, budget}` (units in the budget now,
below 0 in debt, read from the bus once per heartbeat) and `omnidaemon_budget_capacity`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from omnidaemon.metrics import AgentMetricsSnapshot, HistogramSnapshot

__all__ = ["render_prometheus"]

_LABELS = ("app", "topic", "agent")
_COUNTERS = (
    ("received", "Deliveries taken for handling, every attempt included."),
    ("succeeded", "Handler runs that finished and whose outputs were written."),
    ("failed", "Handler runs that raised, timed out or returned a mistyped value."),
    ("retried", "Retries scheduled."),
    ("dead_lettered", "Events moved to the dead-letter queue, whatever the reason."),
    ("throttled", "Times flow control put an event back on the bus to wait for its turn."),
    ("expired", "Events dead-lettered as Expired because they were not started in time."),
    ("cancelled", "Events settled as cancelled: never started, or stopped while they ran."),
)


def render_prometheus(
    snapshots: Sequence[AgentMetricsSnapshot],
    *,
    worker: str,
    app: str,
    budgets: Mapping[str, tuple[float, float]] | None = None,
) -> bytes:
    """The snapshots in the Prometheus text format (version 0.0.4), UTF-8 encoded.

    Args:
        snapshots: One worker's per-agent metrics, at most one per `(topic, agent)`.
        worker: The worker's name, for `omnidaemon_worker_info`.
        app: The app's name, the `app` label of every series.
        budgets: The app's budgets' `(level, capacity)` by name (`omnidaemon.flow.levels`).
    """
    return generate_latest(
        _SnapshotCollector(snapshots, worker=worker, app=app, budgets=budgets or {})
    )


class _SnapshotCollector:
    """Turns snapshots into metric families; a new one per scrape, so it holds no state."""

    def __init__(
        self,
        snapshots: Sequence[AgentMetricsSnapshot],
        *,
        worker: str,
        app: str,
        budgets: Mapping[str, tuple[float, float]],
    ):
        self._snapshots = snapshots
        self._worker = worker
        self._app = app
        self._budgets = budgets

    def collect(self) -> Iterator[Metric]:
        # Imported here: the package's __init__ imports most of omnidaemon.
        from omnidaemon import __version__

        info = GaugeMetricFamily(
            "omnidaemon_worker_info",
            "The worker's name, app and omnidaemon version; always 1.",
            labels=("worker", "app", "version"),
        )
        info.add_metric((self._worker, self._app, __version__), 1)
        yield info

        if self._budgets:
            level = GaugeMetricFamily(
                "omnidaemon_budget_level",
                "Units in the budget now (below 0: in debt), as this worker last read it.",
                labels=("app", "budget"),
            )
            capacity = GaugeMetricFamily(
                "omnidaemon_budget_capacity",
                "Units the budget holds when full.",
                labels=("app", "budget"),
            )
            for name, (units, full) in sorted(self._budgets.items()):
                level.add_metric((self._app, name), units)
                capacity.add_metric((self._app, name), full)
            yield level
            yield capacity

        counters = [
            (name, CounterMetricFamily(f"omnidaemon_events_{name}_total", doc, labels=_LABELS))
            for name, doc in _COUNTERS
        ]
        in_flight = GaugeMetricFamily(
            "omnidaemon_events_in_flight", "Handlers running now.", labels=_LABELS
        )
        duration = HistogramMetricFamily(
            "omnidaemon_handler_duration_seconds",
            "Handler run times, successes and failures alike.",
            labels=_LABELS,
        )
        latency = HistogramMetricFamily(
            "omnidaemon_event_latency_seconds",
            "End-to-end latency of succeeded events, from publication to the handler's end.",
            labels=_LABELS,
        )
        wait = HistogramMetricFamily(
            "omnidaemon_flow_wait_seconds",
            "Time events held back by flow control waited, from first refusal to start.",
            labels=_LABELS,
        )
        for snapshot in self._snapshots:
            labels = (self._app, snapshot.topic, snapshot.agent)
            for name, family in counters:
                family.add_metric(labels, getattr(snapshot, name))
            in_flight.add_metric(labels, snapshot.in_flight)
            duration.add_metric(labels, _buckets(snapshot.duration), snapshot.duration.total)
            latency.add_metric(labels, _buckets(snapshot.latency), snapshot.latency.total)
            wait.add_metric(labels, _buckets(snapshot.wait), snapshot.wait.total)
        for _, family in counters:
            yield family
        yield in_flight
        yield duration
        yield latency
        yield wait


def _buckets(histogram: HistogramSnapshot) -> list[tuple[str, float]]:
    # `le` values written as prometheus_client's own histograms write them ("1.0", "+Inf").
    return [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]
