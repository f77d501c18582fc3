"""Under Ray, a GuardWorker-like actor's metrics reach Ray's metrics agent as ray_mw_* (integration, real Ray)."""

from __future__ import annotations

import time
import urllib.request

import pytest

from tests.support import metrics as metric_reader
from tests.support.metrics import parse_exposition, sample_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Ray's agent exports what workers report every metrics_report_interval_ms (10 s by default); poll up to this.
EXPORT_DEADLINE_S = 60.0


def _scrape_ray_agent(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse_exposition(resp.read().decode())


def _exported(samples: dict[str, float], name: str, worker: str, **labels: str) -> list[float]:
    """Values of ``name`` from ``worker`` whose labels include ``labels`` (Ray adds WorkerId, SessionName, ...)."""
    wanted = [f'worker="{worker}"', *(f'{k}="{v}"' for k, v in labels.items())]
    return [v for k, v in samples.items() if k.startswith(name + "{") and all(w in k for w in wanted)]


def test_bridge_in_an_actor_exports_counters_gauges_and_histograms_through_ray(ray_cluster) -> None:
    import ray

    worker = "ops-test-actor"

    @ray.remote(num_cpus=0, num_gpus=0)
    class MetricsActor:
        def record(self) -> dict[str, float]:
            """Record, start the bridge, and return the actor's own registry (the values Ray must export)."""
            from worker.ops import metrics
            from worker.ops.ray_export import RayMetricsBridge

            metrics.record_verdict("unsafe", ("S9",), cached=False)
            metrics.record_verdict("unsafe", ("S9",), cached=False)
            metrics.BATCH_SIZE.labels(model="default", modality="text").observe(8)
            metrics.REDIS_UP.set(1)
            self.bridge = RayMetricsBridge(constant_tags={"worker": worker}, interval_s=1.0).start()
            return metric_reader.scrape_values()

    actor = MetricsActor.remote()
    try:
        local = ray.get(actor.record.remote(), timeout=60)
        s9 = local[
            sample_key("mw_verdicts_total", {"model": "default", "decision": "unsafe", "category": "S9"})
        ]
        batches = local[sample_key("mw_batch_size_count", {"model": "default", "modality": "text"})]
        le4 = local[sample_key("mw_batch_size_bucket", {"model": "default", "modality": "text", "le": "4.0"})]
        le8 = local[sample_key("mw_batch_size_bucket", {"model": "default", "modality": "text", "le": "8.0"})]
        assert s9 >= 2 and le8 - le4 >= 1  # what this actor recorded (a reused worker process may add more)

        port = ray._private.worker.global_worker.node.metrics_export_port
        deadline = time.monotonic() + EXPORT_DEADLINE_S
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            samples = _scrape_ray_agent(port)
            if _exported(samples, "ray_mw_batch_size_count", worker, modality="text") == [batches]:
                break
            time.sleep(1.0)
        assert _exported(samples, "ray_mw_verdicts_total", worker, decision="unsafe", category="S9") == [s9]
        assert _exported(samples, "ray_mw_redis_up", worker) == [1.0]
        assert _exported(samples, "ray_mw_batch_size_count", worker, modality="text") == [batches]
        assert _exported(samples, "ray_mw_batch_size_bucket", worker, modality="text", le="4.0") == [le4]
        assert _exported(samples, "ray_mw_batch_size_bucket", worker, modality="text", le="8.0") == [le8]
    finally:
        ray.kill(actor)
