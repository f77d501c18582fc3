"""GuardWorker as a plain object (no Ray): the actor's logic against the real broker, Redis and tiny model."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.kafka_io import build_stream, produce, read_json
from worker.engine.registry import ModelRegistry
from worker.runners.ray_actor import GuardWorker
from worker.runners.ray_env import settings_payload

pytestmark = [pytest.mark.integration]


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_guard_worker_runs_the_pipeline_in_a_thread_reports_status_and_drains_on_stop(
    make_settings: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as Ray would set it for GPU 1; no CUDA here, so CPU
    settings = make_settings(model__path=str(tiny_model_dir), ops__port=9400, batching__max_wait_ms=10)
    stream = build_stream(
        40, seed=3, repeat_ratio=0.2, image_ratio=0.05, malformed_ratio=0.05, id_prefix="gw"
    )
    produce(settings, stream.records, partitions=2)

    worker = GuardWorker(settings_payload(settings), worker_index=3)
    try:
        assert worker.status().worker_index == 3
        wait_until(worker.ready, 60, "model loaded and partitions assigned")
        wait_until(
            lambda: worker.status().counters["completed"] == len(stream.records), 60, "every record done"
        )
        status = worker.status()
        assert status.gpu_ids == ("1",) and status.device == "cpu"
        assert status.model_loaded and sorted(status.assigned) == [
            f"{settings.topics.events}-0",
            f"{settings.topics.events}-1",
        ]
        assert status.failed is None and status.running
        # Its own /metrics on an ephemeral port (several actors share a node).
        assert status.ops_port not in (None, 0, 9400)
        with urllib.request.urlopen(f"http://127.0.0.1:{status.ops_port}/metrics", timeout=5) as response:
            assert b"mw_events_consumed_total" in response.read()
    finally:
        final = worker.stop(deadline_s=20)
    assert final.drained and final.stopped and not final.running
    assert not worker.ready()
    verdict_ids = {v["event_id"] for v in read_json(settings, settings.topics.verdicts)}
    assert verdict_ids == stream.valid_ids


def test_a_worker_stopped_while_it_loads_reports_drained_at_once_and_never_joins(
    make_settings: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaling in can pick an actor that is still loading its model: it holds nothing, so its stop is immediate."""
    loading, release = threading.Event(), threading.Event()
    real_load = ModelRegistry.from_settings.__func__  # type: ignore[attr-defined]

    def slow_load(cls: type, settings: Any, names: Any = None) -> ModelRegistry:
        loading.set()
        assert release.wait(60), "the test never released the model load"
        return real_load(cls, settings, names)

    monkeypatch.setattr(ModelRegistry, "from_settings", classmethod(slow_load))
    settings = make_settings(model__path=str(tiny_model_dir), ops__port=0)
    produce(settings, build_stream(4, seed=5, id_prefix="late").records, partitions=2)
    worker = GuardWorker(settings_payload(settings), worker_index=1)
    assert loading.wait(30)
    # Were the stop to wait for the load, it would wait out the whole deadline and report drained=False.
    final = worker.stop(deadline_s=5)
    assert final.drained is True and final.stopped and not final.assigned
    release.set()
    wait_until(lambda: not worker.status().running, 60, "the start-up to end on its own")
    assert worker.status().failed is None and worker.pipeline.counters["consumed"] == 0
    assert read_json(settings, settings.topics.verdicts) == []
