"""Agent metrics (`omnidaemon.metrics`): histograms, quantiles, and the deltas sent to the bus."""

from __future__ import annotations

import random

import pytest

from omnidaemon.metrics import (
    BUCKETS,
    COUNTERS,
    AgentMetrics,
    AgentMetricsSnapshot,
    HistogramSnapshot,
)

LAST = len(BUCKETS)  # the bucket above the largest bound


def histogram(**buckets: int) -> HistogramSnapshot:
    """A histogram with `b<index>=count` observations."""
    counts = [0] * (LAST + 1)
    for name, count in buckets.items():
        counts[int(name[1:])] = count
    return HistogramSnapshot(tuple(counts), 0.0)


def placed(seconds: float) -> int:
    """The bucket one observation of `seconds` lands in."""
    metrics = AgentMetrics("t.x", "a")
    metrics.observe_duration(seconds)
    counts = metrics.snapshot().duration.counts
    assert sum(counts) == 1
    return counts.index(1)


# Histograms -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(LAST))
def test_an_observation_at_a_bound_falls_in_that_bound_s_bucket(index: int) -> None:
    bound = BUCKETS[index]
    assert placed(bound) == index
    assert placed(bound * 1.0001) == index + 1
    assert placed(bound * 0.9999) == index


def test_zero_and_huge_observations() -> None:
    assert placed(0.0) == 0
    assert placed(BUCKETS[-1] + 1) == LAST
    assert placed(1e9) == LAST


def test_negative_latency_counts_as_zero() -> None:
    # Clocks of different machines disagree a little: an event "from the future" is 0 s old.
    metrics = AgentMetrics("t.x", "a")
    metrics.observe_latency(-0.5)
    latency = metrics.snapshot().latency
    assert latency.counts[0] == 1 and latency.count == 1
    assert latency.total == 0.0


def test_sums_and_means() -> None:
    metrics = AgentMetrics("t.x", "a")
    for seconds in (0.25, 0.5, 1.5):
        metrics.observe_duration(seconds)
    duration = metrics.snapshot().duration
    assert duration.count == 3
    assert duration.total == pytest.approx(2.25)
    assert duration.mean == pytest.approx(0.75)
    assert HistogramSnapshot.empty().mean is None
    assert metrics.snapshot().latency == HistogramSnapshot.empty()


def test_quantiles_interpolate_within_their_bucket() -> None:
    upper = BUCKETS.index(0.25)
    ten = histogram(**{f"b{upper}": 10})  # ten observations in (0.1, 0.25]
    assert ten.quantile(0.5) == pytest.approx(0.175)
    assert ten.quantile(0.9) == pytest.approx(0.1 + 0.15 * 0.9)
    assert ten.quantile(1.0) == pytest.approx(0.25)
    assert ten.quantile(0.0) == pytest.approx(0.1)

    one, second = BUCKETS.index(1.0), BUCKETS.index(0.0005)
    split = histogram(**{f"b{second}": 5, f"b{one}": 5})  # 5 at <= 0.5 ms, 5 in (0.5, 1]
    assert split.quantile(0.5) == pytest.approx(0.0005)  # the top of the low bucket
    assert split.quantile(0.6) == pytest.approx(0.5 + 0.5 * 1 / 5)
    assert split.quantile(0.9) == pytest.approx(0.9)
    assert split.quantile(0.99) == pytest.approx(0.5 + 0.5 * 4.9 / 5)


def test_quantiles_of_empty_and_overflowing_histograms() -> None:
    assert HistogramSnapshot.empty().quantile(0.5) is None
    above = histogram(**{f"b{LAST}": 3})
    assert above.quantile(0.5) == BUCKETS[-1]
    assert above.quantile(1.0) == BUCKETS[-1]
    mixed = histogram(b0=9, **{f"b{LAST}": 1})
    assert mixed.quantile(0.5) == pytest.approx(0.0005 * 5 / 9)
    assert mixed.quantile(0.99) == BUCKETS[-1]


def test_cumulative_buckets_and_json() -> None:
    metrics = AgentMetrics("t.x", "a")
    for seconds in (0.0001, 0.003, 0.003, 7200.0):
        metrics.observe_duration(seconds)
    duration = metrics.snapshot().duration
    pairs = duration.cumulative()
    assert len(pairs) == LAST + 1
    assert pairs[0] == (0.0005, 1)
    assert dict(pairs)[0.005] == 3
    assert dict(pairs)[3600.0] == 3
    assert pairs[-1] == (float("inf"), 4)
    data = duration.to_json()
    assert data["count"] == 4
    assert data["buckets"]["0.0005"] == 1
    assert data["buckets"]["+Inf"] == 4
    assert data["sum"] == pytest.approx(7200.0061)
    assert set(data) == {"count", "sum", "mean", "p50", "p90", "p99", "buckets"}


# Deltas: what each ack batch writes to the bus -------------------------------------------


class Bus:
    """The bus's metrics hash of one agent: increments summed, like HINCRBY."""

    def __init__(self) -> None:
        self.fields: dict[str, int] = {}

    def write(self, delta: dict[str, int]) -> None:
        for name, increment in delta.items():
            self.fields[name] = self.fields.get(name, 0) + increment

    def snapshot(self) -> AgentMetricsSnapshot:
        return AgentMetricsSnapshot.from_fields("t.x", "a", self.fields)


def test_a_fresh_agent_has_nothing_to_send() -> None:
    assert AgentMetrics("t.x", "a").delta() == {}


def test_committed_deltas_are_not_sent_again() -> None:
    metrics, bus = AgentMetrics("t.x", "a"), Bus()
    metrics.received += 2
    metrics.succeeded += 1
    metrics.observe_duration(0.003)
    first = metrics.delta()
    assert first == {
        "received": 2,
        "succeeded": 1,
        f"duration:{placed(0.003)}": 1,
        "duration:sum_us": 3000,
    }
    bus.write(first)
    metrics.commit(first)
    assert metrics.delta() == {}
    metrics.received += 1
    metrics.failed += 1
    assert metrics.delta() == {"received": 1, "failed": 1}


def test_a_delta_that_was_not_committed_is_sent_again_with_what_followed() -> None:
    metrics, bus = AgentMetrics("t.x", "a"), Bus()
    metrics.received += 1
    lost = metrics.delta()  # the ack carrying it failed: not committed
    assert lost == {"received": 1}
    metrics.received += 1
    metrics.retried += 1
    again = metrics.delta()
    assert again == {"received": 2, "retried": 1}
    bus.write(again)
    metrics.commit(again)
    assert metrics.delta() == {}
    assert bus.fields == {"received": 2, "retried": 1}


def test_counts_made_while_a_delta_is_on_its_way_are_sent_next() -> None:
    metrics, bus = AgentMetrics("t.x", "a"), Bus()
    metrics.received += 1
    metrics.observe_latency(0.02)
    in_flight = metrics.delta()
    # The ack round trip is under way: more is counted meanwhile.
    metrics.received += 1
    metrics.observe_latency(0.02)
    bus.write(in_flight)
    metrics.commit(in_flight)
    rest = metrics.delta()
    assert rest == {"received": 1, f"latency:{BUCKETS.index(0.025)}": 1, "latency:sum_us": 20000}
    bus.write(rest)
    metrics.commit(rest)
    assert bus.snapshot() == metrics.snapshot()


def test_random_histories_reach_the_bus_exactly_once() -> None:
    rng = random.Random(1234)
    for _ in range(50):
        metrics, bus = AgentMetrics("t.x", "a"), Bus()
        for _ in range(rng.randrange(1, 40)):
            for _ in range(rng.randrange(0, 5)):
                setattr(metrics, name := rng.choice(COUNTERS), getattr(metrics, name) + 1)
                metrics.observe_duration(rng.expovariate(10))
                metrics.observe_latency(rng.uniform(-0.01, 100))
            delta = metrics.delta()
            if rng.random() < 0.3:
                continue  # the ack failed: nothing written, nothing committed
            if rng.random() < 0.5:  # counted while the write is on its way
                metrics.received += 1
                metrics.observe_duration(0.7)
            bus.write(delta)
            metrics.commit(delta)
        final = metrics.delta()
        bus.write(final)
        metrics.commit(final)
        assert metrics.delta() == {}
        assert bus.snapshot() == metrics.snapshot()


# Snapshots --------------------------------------------------------------------------------


def test_a_snapshot_survives_the_round_trip_through_the_bus_fields() -> None:
    metrics = AgentMetrics("orders.placed", "work")
    metrics.received, metrics.succeeded, metrics.failed = 7, 4, 3
    metrics.retried, metrics.dead_lettered, metrics.in_flight = 2, 1, 5
    for seconds in (0.0004, 0.07, 3.0, 4000.0):
        metrics.observe_duration(seconds)
        metrics.observe_latency(seconds * 2)
    snapshot = metrics.snapshot()
    assert snapshot.in_flight == 5
    # On the bus: only the fields, every one an integer; in flight comes from heartbeats.
    fields = metrics.delta()
    assert all(isinstance(v, int) for v in fields.values())
    again = AgentMetricsSnapshot.from_fields("orders.placed", "work", fields, in_flight=5)
    assert again == snapshot
    assert again.duration.total == pytest.approx(4003.0704)
    assert again.latency.count == 4
    data = again.to_json()
    assert {name: data[name] for name in COUNTERS} == {
        "received": 7,
        "succeeded": 4,
        "failed": 3,
        "retried": 2,
        "dead_lettered": 1,
    }
    assert (data["topic"], data["agent"], data["in_flight"]) == ("orders.placed", "work", 5)
    assert data["duration_seconds"]["count"] == 4


def test_from_fields_of_nothing_is_all_zero() -> None:
    empty = AgentMetricsSnapshot.from_fields("t.x", "a", {})
    assert empty == AgentMetricsSnapshot("t.x", "a")
    assert all(getattr(empty, name) == 0 for name in COUNTERS)
    assert empty.duration == empty.latency == HistogramSnapshot.empty()
