"""A Ray Serve replica's ``mw_*`` metrics reach its node's metrics export port as ``ray_mw_*`` (real Ray and Serve).

The replica starts ``export_to_ray("serve-<replica>")`` when it is built; what it counts while answering
``POST /v1/moderate`` must appear on the node's export port (what the chart's PodMonitor scrapes), tagged
with its own ``worker`` name.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.ops.test_metrics_multinode import _by_worker
from tests.serve.test_serve_http import _wait_ready
from tests.support.metrics import parse_exposition
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.serve.app import build_app

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

APP, ROUTE = "metrics-export", "/metrics-export"
EVENTS = 6
EXPORT_DEADLINE_S = 90.0


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse_exposition(response.read().decode())


def _post(url: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}{ROUTE}/v1/moderate",
        data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_a_serve_replicas_metrics_are_exported_through_ray_with_its_own_worker_tag(
    serve_http: str, services: Any, tiny_model_dir: Path
) -> None:
    import ray
    from ray import serve

    port = ray._private.worker.global_worker.node.metrics_export_port
    # Replicas of other apps in this session export too: only a worker tag that is new counts.
    before = set(_by_worker(_scrape(port), "ray_mw_events_consumed_total"))
    settings = {
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "redis": {"url": services.redis_url, "key_prefix": f"mw:serve-metrics:{uuid.uuid4().hex[:8]}:"},
        "serve": {"num_gpus": 0},
        "logging": {"level": "WARNING"},
    }
    serve.run(build_app({"settings": settings}), name=APP, route_prefix=ROUTE, blocking=False)
    try:
        _wait_ready(serve_http + ROUTE)  # the replica loads its model in the background
        pool = [e for e in synthetic_examples(40, seed=31, split="heldout") if not e.has_image][:EVENTS]
        events = [{**e.event, "event_id": f"serve-metrics-{uuid.uuid4().hex[:8]}"} for e in pool]
        verdicts = _post(serve_http, events)
        assert len(verdicts) == EVENTS

        deadline = time.monotonic() + EXPORT_DEADLINE_S
        consumed: dict[str, float] = {}
        while time.monotonic() < deadline:
            samples = _scrape(port)
            consumed = {
                w: v
                for w, v in _by_worker(samples, "ray_mw_events_consumed_total").items()
                if w.startswith("serve-") and w not in before
            }
            if sum(consumed.values()) >= EVENTS:
                break
            time.sleep(1.0)
        assert len(consumed) == 1 and sum(consumed.values()) == EVENTS, consumed
        (replica,) = consumed
        assert _by_worker(samples, "ray_mw_redis_up")[replica] == 1.0
        assert replica in _by_worker(samples, "ray_mw_flagged_events_total")
    finally:
        serve.delete(APP)
