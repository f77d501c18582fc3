"""RayMetricsBridge copies counter increases, gauge values and histogram buckets exactly into a sink."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.ops.ray_export import RayMetricsBridge, _midpoint


class RecordingSink:
    """Collects what the bridge sends, keyed by (metric, sorted labels)."""

    def __init__(self) -> None:
        self.counters: Tally[tuple[str, tuple]] = Tally()
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.observations: list[tuple[str, tuple, float, int, tuple[float, ...]]] = []

    def inc(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name, doc, boundaries, labels, value, count) -> None:
        self.observations.append((name, tuple(sorted(labels.items())), value, count, tuple(boundaries)))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_counters_are_copied_as_increases_since_the_last_copy(registry: CollectorRegistry) -> None:
    events = Counter("mw_events_consumed_total", "x", ["outcome"], registry=registry)
    other = Counter("other_total", "not ours", registry=registry)
    sink = RecordingSink()
    bridge = RayMetricsBridge(registry, sink=sink)

    events.labels(outcome="verdict").inc(3)
    other.inc()
    bridge.mirror_once()
    events.labels(outcome="verdict").inc(2)
    events.labels(outcome="cached").inc()
    bridge.mirror_once()
    bridge.mirror_once()  # nothing new: nothing sent

    assert sink.counters == {
        ("mw_events_consumed", (("outcome", "verdict"),)): 5,
        ("mw_events_consumed", (("outcome", "cached"),)): 1,
    }


def test_a_counter_series_is_sent_at_zero_when_first_seen(registry: CollectorRegistry) -> None:
    dropped = Counter("mw_engine_dropped_codes_total", "x", ["code"], registry=registry)
    dropped.labels(code="S1")
    sink = RecordingSink()
    RayMetricsBridge(registry, sink=sink).mirror_once()
    assert list(sink.counters.items()) == [(("mw_engine_dropped_codes", (("code", "S1"),)), 0)]


def test_gauges_are_copied_as_current_values(registry: CollectorRegistry) -> None:
    lag = Gauge("mw_consumer_lag", "x", ["topic", "partition"], registry=registry)
    sink = RecordingSink()
    bridge = RayMetricsBridge(registry, sink=sink)
    lag.labels(topic="t", partition="0").set(7)
    bridge.mirror_once()
    lag.labels(topic="t", partition="0").set(2)
    bridge.mirror_once()
    assert sink.gauges == {("mw_consumer_lag", (("partition", "0"), ("topic", "t"))): 2}


def test_histogram_bucket_counts_are_replayed_exactly_into_the_same_buckets(
    registry: CollectorRegistry,
) -> None:
    bounds = (0.01, 0.1, 1.0)
    stage = Histogram("mw_stage_seconds", "x", ["stage"], buckets=bounds, registry=registry)
    sink = RecordingSink()
    bridge = RayMetricsBridge(registry, sink=sink)
    for value in (0.005, 0.05, 0.05, 0.5, 5.0):
        stage.labels(stage="model").observe(value)
    bridge.mirror_once()
    stage.labels(stage="model").observe(0.05)
    bridge.mirror_once()

    per_bucket: Tally[int] = Tally()
    for name, labels, value, count, sent_bounds in sink.observations:
        assert (name, labels, sent_bounds) == ("mw_stage_seconds", (("stage", "model"),), bounds)
        index = sum(value > b for b in bounds)  # which bucket the replayed value lands in
        per_bucket[index] += count
    assert per_bucket == {0: 1, 1: 3, 2: 1, 3: 1}
    assert not [o for o in sink.observations if o[1] != (("stage", "model"),)]


def test_midpoints_fall_strictly_inside_their_bucket() -> None:
    bounds = [0.001, 0.01, 1.0]
    assert _midpoint(bounds, 0) == 0.0005
    assert 0.001 < _midpoint(bounds, 1) < 0.01
    assert _midpoint(bounds, 3) > bounds[-1]


def test_a_failing_sink_does_not_stop_other_metrics(registry: CollectorRegistry) -> None:
    Counter("mw_a_total", "x", registry=registry).inc()
    Gauge("mw_b", "x", registry=registry).set(1)

    class Flaky(RecordingSink):
        def inc(self, *args, **kwargs) -> None:
            raise RuntimeError("ray metrics unavailable")

    sink = Flaky()
    RayMetricsBridge(registry, sink=sink).mirror_once()
    assert sink.gauges == {("mw_b", ()): 1}


def test_start_copies_at_once_and_stop_makes_a_final_copy(registry: CollectorRegistry) -> None:
    events = Counter("mw_events_consumed_total", "x", registry=registry)
    sink = RecordingSink()
    bridge = RayMetricsBridge(registry, sink=sink, interval_s=3600).start()
    events.inc(4)
    bridge.stop()
    assert sink.counters == {("mw_events_consumed", ()): 4}


def test_export_to_ray_does_nothing_outside_a_ray_actor() -> None:
    from worker.ops.ray_export import export_to_ray

    assert export_to_ray("not-an-actor") is None
