"""Scrape a real ``moderation-worker run`` (subprocess, embedded broker and Redis, trained tiny model) while
events flow: the counters, histograms and gauges move as the stream says they must."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from tests.reliability.accounting import WorkerProcess, wait_until_answered, write_config
from tests.stream.streaming import build_stream, produce
from tests.support.metrics import sample_key, scrape
from worker.dev.services import free_port
from worker.stream.kafka_clients import ensure_topics

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(predicate, timeout_s: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        assert worker.alive, worker.log_tail()
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{worker.log_tail()}")


def test_metrics_move_while_events_flow(make_settings, tiny_model_dir, tmp_path):
    port = free_port()
    settings = make_settings(model__path=str(tiny_model_dir), model__device="cpu", ops__port=port)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    ensure_topics(settings, [settings.topics.events], partitions=4)
    worker = WorkerProcess(write_config(settings, tmp_path / "w.yaml"), tmp_path / "w.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(base + "/readyz")[0] == 200, 120, "readiness", worker)
        assert _get(base + "/healthz")[0] == 200
        before = scrape(base + "/metrics")

        stream = build_stream(300, seed=41, repeat_ratio=0.2, image_ratio=0.1, malformed_ratio=0.05)
        produce(settings, stream.records)
        result = wait_until_answered(settings, len(stream.records), timeout_s=300)
        assert result.lost == []
        # Counters are updated before offsets are committed; give the last batch a moment to be counted.
        total_valid, total_bad = len(stream.valid_ids), len(stream.malformed)

        def counted() -> bool:
            now = scrape(base + "/metrics")
            consumed = sum(
                now.get(sample_key("mw_events_consumed_total", {"outcome": o}), 0)
                - before.get(sample_key("mw_events_consumed_total", {"outcome": o}), 0)
                for o in ("verdict", "dead_letter", "cached")
            )
            return consumed >= len(stream.records)

        _wait(counted, 30, "consumed counters", worker)
        after = scrape(base + "/metrics")
    finally:
        code, _ = worker.terminate(timeout_s=60)
        worker.close()
    assert code == 0

    def delta(name: str, **labels: str) -> float:
        key = sample_key(name, labels or None)
        return after.get(key, 0.0) - before.get(key, 0.0)

    dead = delta("mw_events_consumed_total", outcome="dead_letter")
    answered = delta("mw_events_consumed_total", outcome="verdict") + delta(
        "mw_events_consumed_total", outcome="cached"
    )
    assert dead == total_bad
    assert answered == total_valid
    reasons = {}
    for _, reason in stream.malformed:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in reasons.items():
        assert delta("mw_dead_letters_total", reason=reason) == n, reason
    assert delta("mw_verdicts_total", model="default", decision="safe", category="none") > 0
    assert (
        sum(
            delta("mw_verdicts_total", model="default", decision="unsafe", category=c)
            for c in ("S1", "S9", "S13")
        )
        > 0
    )
    # Histograms: batches went through the model and every stage was timed.
    assert delta("mw_batch_size_count", model="default", modality="text") > 0
    assert delta("mw_batch_size_count", model="default", modality="image") > 0
    # Token positions computed by the forward passes, and the padding among them (never more than all).
    for modality in ("text", "image"):
        computed = delta("mw_forward_positions_total", model="default", modality=modality)
        padding = delta("mw_forward_padding_positions_total", model="default", modality=modality)
        assert computed > 0 and 0 <= padding < computed, modality
    for stage in ("decode", "cache", "prepare", "model", "publish", "commit"):
        assert delta("mw_stage_seconds_count", stage=stage) > 0, stage
    assert delta("mw_end_to_end_seconds_count") >= total_valid
    assert delta("mw_cache_requests_total", result="miss") > 0
    assert after[sample_key("mw_redis_up")] == 1
    assert after[sample_key("mw_model_load_seconds")] > 0
    lag_keys = [k for k in after if k.startswith("mw_consumer_lag{")]
    assert len(lag_keys) == 4 and all(after[k] == 0 for k in lag_keys), lag_keys
