"""The metrics module follows Prometheus conventions and exports every agreed metric."""

from __future__ import annotations

import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from tests.support import metrics as metric_reader
from worker.config import CATEGORY_CODES
from worker.contracts.rejections import Reason
from worker.ops import metrics

# The agreed list in the interfaces brief (mw_duplicates_skipped_total is the optional one, exported too).
AGREED_METRICS = {
    "mw_events_consumed_total": ("counter", {"outcome"}),
    "mw_verdicts_total": ("counter", {"model", "decision", "category"}),
    "mw_dead_letters_total": ("counter", {"reason"}),
    "mw_cache_requests_total": ("counter", {"result"}),
    "mw_batch_size": ("histogram", {"model", "modality"}),
    "mw_stage_seconds": ("histogram", {"stage"}),
    "mw_end_to_end_seconds": ("histogram", set()),
    "mw_consumer_lag": ("gauge", {"topic", "partition"}),
    "mw_in_flight_events": ("gauge", set()),
    "mw_paused_partitions": ("gauge", set()),
    "mw_model_load_seconds": ("gauge", set()),
    "mw_redis_up": ("gauge", set()),
    "mw_engine_dropped_codes_total": ("counter", {"code"}),
    "mw_duplicates_skipped_total": ("counter", set()),
    # Review band, blocklists and the producer-side lag (created_at -> verdict).
    "mw_review_band_total": ("counter", set()),
    "mw_blocklist_hits_total": ("counter", {"action"}),
    "mw_event_lag_seconds": ("histogram", set()),
    "mw_worker_ready": ("gauge", set()),
    "mw_intake_processes": ("gauge", set()),
    "mw_preparation_processes": ("gauge", set()),
    "mw_intake_process_answers_total": ("counter", set()),
    "mw_ray_workers_alive": ("gauge", set()),
    # Flagged events once per event (mw_verdicts_total counts an unsafe verdict once per category).
    "mw_flagged_events_total": ("counter", set()),
    # The Ray driver's lag autoscaler.
    "mw_ray_workers_desired": ("gauge", set()),
    "mw_group_lag": ("gauge", set()),
    # A failing dependency stops the stream (engine / delivery outage) and crash replays stay quiet.
    "mw_outage": ("gauge", {"cause"}),
    "mw_outages_total": ("counter", {"cause"}),
    "mw_outage_retries_total": ("counter", {"cause"}),
    "mw_replays_skipped_total": ("counter", set()),
    # Padding computed by forward passes (fraction = padding / positions).
    "mw_forward_positions_total": ("counter", {"model", "modality"}),
    "mw_forward_padding_positions_total": ("counter", {"model", "modality"}),
}


def _families() -> dict[str, tuple[str, str, set[str]]]:
    """Exposed name -> (type, help, label names) of every metric object defined in worker.ops.metrics."""
    out = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            (family,) = obj.describe()
            exposed = family.name + ("_total" if family.type == "counter" else "")
            # prometheus_client has no public accessor for a parent's label names.
            out[exposed] = (family.type, family.documentation, set(obj._labelnames))
    return out


def test_every_agreed_metric_is_exported_with_its_type_and_labels() -> None:
    families = _families()
    for name, (kind, labels) in AGREED_METRICS.items():
        assert name in families, f"{name} missing"
        assert families[name][0] == kind, name
        assert families[name][2] == labels, name
    assert set(families) == set(AGREED_METRICS), "exported metrics differ from the agreed list"


def test_names_follow_prometheus_conventions() -> None:
    for name, (kind, help_text, _) in _families().items():
        assert re.fullmatch(r"mw_[a-z][a-z0-9_]*", name), name
        assert help_text, f"{name} has no help text"
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"only counters end in _total: {name}"
        if "seconds" in name or "latency" in name or "time" in name:
            assert name.endswith("_seconds"), f"time metrics are in seconds: {name}"
        assert not re.search(r"_(ms|milliseconds|minutes)(_|$)", name), f"base units only: {name}"


def test_histogram_buckets_cover_sub_millisecond_to_tens_of_seconds_and_batch_sizes() -> None:
    assert metrics.STAGE_BUCKETS_SECONDS[0] <= 0.001 and metrics.STAGE_BUCKETS_SECONDS[-1] >= 10
    assert metrics.END_TO_END_BUCKETS_SECONDS[-1] >= 60
    assert list(metrics.STAGE_BUCKETS_SECONDS) == sorted(metrics.STAGE_BUCKETS_SECONDS)
    assert metrics.BATCH_SIZE_BUCKETS[0] == 1 and metrics.BATCH_SIZE_BUCKETS[-1] >= 4096


def test_known_label_values_are_exposed_at_zero_before_any_event() -> None:
    scrape = metric_reader.parse_exposition(metrics.exposition().decode())
    for outcome in metrics.OUTCOMES:
        assert metric_reader.sample_key("mw_events_consumed_total", {"outcome": outcome}) in scrape
    for reason in Reason:
        assert metric_reader.sample_key("mw_dead_letters_total", {"reason": reason.value}) in scrape
    for stage in metrics.STAGES:
        assert metric_reader.sample_key("mw_stage_seconds_count", {"stage": stage}) in scrape
    for code in CATEGORY_CODES:
        assert metric_reader.sample_key("mw_engine_dropped_codes_total", {"code": code}) in scrape
    assert "mw_flagged_events_total" in scrape


def test_the_driver_registry_holds_only_the_drivers_metrics() -> None:
    driver = metric_reader.parse_exposition(metrics.exposition(metrics.DRIVER_REGISTRY).decode())
    assert {k for k in driver if k.startswith("mw_")} == {
        "mw_ray_workers_alive",
        "mw_ray_workers_desired",
        "mw_group_lag",
    }
    worker = metric_reader.scrape_values()
    assert "mw_redis_up" in worker and "mw_ray_workers_alive" not in worker


def test_observe_stage_times_the_block_even_when_it_raises() -> None:
    key = metric_reader.sample_key("mw_stage_seconds_count", {"stage": "publish"})
    before = metric_reader.scrape_values()[key]
    with metrics.observe_stage("publish"):
        pass
    with pytest.raises(RuntimeError), metrics.observe_stage("publish"):
        raise RuntimeError("publish failed")
    assert metric_reader.scrape_values()[key] == before + 2


def test_observe_stage_rejects_an_unknown_stage() -> None:
    with pytest.raises(ValueError, match="unknown stage"), metrics.observe_stage("tokenize"):
        pass


def test_record_helpers_count_outcomes_categories_and_reasons() -> None:
    before = metric_reader.scrape_values()
    metrics.record_verdict("unsafe", ("S1", "S9"), cached=False)
    metrics.record_verdict("safe", (), cached=True)
    metrics.record_verdict("unsafe", ("S1",), cached=False, model="text")
    metrics.record_dead_letter(Reason.INVALID_JSON)
    after = metric_reader.scrape_values()

    def moved(name: str, **labels: str) -> float:
        key = metric_reader.sample_key(name, labels)
        return after[key] - before.get(key, 0.0)

    assert moved("mw_events_consumed_total", outcome="verdict") == 2
    assert moved("mw_events_consumed_total", outcome="cached") == 1
    assert moved("mw_events_consumed_total", outcome="dead_letter") == 1
    assert moved("mw_verdicts_total", model="default", decision="unsafe", category="S1") == 1
    assert moved("mw_verdicts_total", model="default", decision="unsafe", category="S9") == 1
    assert moved("mw_verdicts_total", model="default", decision="safe", category="none") == 1
    assert moved("mw_verdicts_total", model="text", decision="unsafe", category="S1") == 1
    assert moved("mw_flagged_events_total") == 2  # two unsafe events, one of them with two categories
    assert moved("mw_dead_letters_total", reason="invalid_json") == 1


def test_record_verdicts_counts_flagged_events_once_per_event() -> None:
    key = metric_reader.sample_key("mw_flagged_events_total")
    before = metric_reader.scrape_values()[key]
    metrics.record_verdicts(
        {("unsafe", ("S1", "S2", "S3"), False, "default"): 4, ("safe", (), True, "default"): 5}
    )
    assert metric_reader.scrape_values()[key] - before == 4


def test_partition_lag_is_set_and_forgotten_on_revocation() -> None:
    metrics.set_partition_lag("chat.events", 3, 42)
    key = metric_reader.sample_key("mw_consumer_lag", {"topic": "chat.events", "partition": "3"})
    assert metric_reader.scrape_values()[key] == 42
    metrics.forget_partition("chat.events", 3)
    metrics.forget_partition("chat.events", 3)  # idempotent
    assert key not in metric_reader.scrape_values()


def test_parse_exposition_keys_samples_by_sorted_labels() -> None:
    text = (
        "# TYPE x_total counter\n"
        'x_total{b="2",a="1"} 3.0\n'
        'x_created{b="2",a="1"} 1.7e9\n'
        "# TYPE y gauge\n"
        "y 5\n"
    )
    assert metric_reader.parse_exposition(text) == {'x_total{a="1",b="2"}': 3.0, "y": 5.0}


def test_observe_many_counts_exactly_what_observing_one_by_one_counts() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    def samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for family in histogram.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    values = [0.0, 0.001, 0.0049, 0.005, 0.0051, 0.25, 1.0, 7.5, 10.0, 59.9, 1e9, 0.1, 0.1]
    buckets = (0.001, 0.005, 0.1, 1.0, 10.0, 60.0)
    one, many = (
        Histogram("h", "h", buckets=buckets, registry=CollectorRegistry()),
        Histogram("h", "h", buckets=buckets, registry=CollectorRegistry()),
    )
    for value in values:
        one.observe(value)
    metrics.observe_many(many, values)
    metrics.observe_many(many, [])
    assert samples(many) == samples(one)
    # Boundaries: a value equal to a bound falls in that bound's bucket (le), as observe() puts it.
    assert dict((s[1].get("le"), s[2]) for s in samples(many) if s[0] == "h_bucket")["0.005"] == 4
    # A child of a labelled histogram, and the real metrics the stream feeds.
    labelled = Histogram("l", "l", ["model"], buckets=buckets, registry=CollectorRegistry())
    metrics.observe_many(labelled.labels(model="m"), values)
    assert [s[2] for s in samples(labelled) if s[0] == "l_count"] == [len(values)]
    before = metric_reader.scrape_values().get("mw_end_to_end_seconds_count", 0.0)
    metrics.observe_many(metrics.END_TO_END_SECONDS, [0.2, 0.3])
    assert metric_reader.scrape_values()["mw_end_to_end_seconds_count"] == before + 2
