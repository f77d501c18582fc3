"""A live scrape of a multi-node Ray cluster while events flow: every GuardWorker actor's ``mw_*`` series reach
its node's metrics export port (what a KubeRay PodMonitor scrapes), and every metric the Grafana dashboard
queries is in that scrape (Ray's ``ray_mw_*`` renamed to ``mw_*`` like the chart's PodMonitor does, plus the
driver's own ``/metrics``).

The cluster is ``multinode_cluster`` (tests/fixtures/multinode.py: Ray's ``ray.cluster_utils.Cluster``, a head
without GPUs + two one-GPU nodes, each its own raylet, all on 127.0.0.1); the driver is
``python -m worker run --ray`` joining it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.multinode import WORKER_NODES, MultiNodeCluster
from tests.fixtures.ray_cluster import free_port
from tests.ops.helpers import REPO
from tests.ops.test_dashboard import _queries, promql_references
from tests.stream.streaming import build_stream, produce, read_json
from tests.support.metrics import parse_exposition
from worker.runners.ray_env import LOCAL_RAY_ENV
from worker.stream.kafka_clients import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 4
ACTORS = WORKER_NODES  # one actor per one-GPU node
# Ray's agent exports what workers report every few seconds; the bridge copies every 5 s.
EXPORT_DEADLINE_S = 120.0

_NODE_PORTS = """
import json, ray
ray.init(address="auto", include_dashboard=False)
print(json.dumps([n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]]))
"""


def _node_metrics_ports(address: str) -> list[int]:
    env = {**os.environ, **LOCAL_RAY_ENV, "RAY_ADDRESS": address}
    out = subprocess.run(
        [sys.executable, "-c", _NODE_PORTS], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse_exposition(response.read().decode())


_WORKER = re.compile(r'worker="([^"]+)"')


def _by_worker(samples: dict[str, float], name: str) -> dict[str, float]:
    """Sum of ``name``'s samples per ``worker`` label."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        if key.startswith(name + "{") and (match := _WORKER.search(key)):
            out[match.group(1)] = out.get(match.group(1), 0.0) + value
    return out


def test_live_scrape_of_a_multi_node_cluster_shows_mw_series_from_every_actor_and_feeds_every_panel(
    multinode_cluster: MultiNodeCluster, make_settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cluster_address = multinode_cluster.address
    assert len(multinode_cluster.nodes) == ACTORS
    ops_port = free_port()
    settings = make_settings(
        model__path=str(tiny_model_dir),
        ray__address=cluster_address,
        ray__num_workers=ACTORS,
        ray__num_gpus_per_worker=1.0,
        ops__host="127.0.0.1",
        ops__port=ops_port,
        shutdown__drain_timeout_s=15.0,
        batching__max_wait_ms=20,
        logging__format="json",
    )
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(settings.masked()))
    stream = build_stream(
        80, seed=12, repeat_ratio=0.2, image_ratio=0.0, malformed_ratio=0.05, id_prefix="scrape"
    )

    log_path = tmp_path / "driver.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_") and k != "RAY_ADDRESS"}
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--ray", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**env, **LOCAL_RAY_ENV},
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 240
            while f"all {ACTORS} guard workers ready" not in log_path.read_text():
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            produce(settings, stream.records, partitions=PARTITIONS)
            deadline = time.monotonic() + 180
            while {v["event_id"] for v in read_json(settings, settings.topics.verdicts)} != stream.valid_ids:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(1.0)
            flagged = {v["event_id"] for v in read_json(settings, settings.topics.flagged)}

            ports = _node_metrics_ports(cluster_address)
            assert len(ports) == ACTORS + 1  # head + one node per actor
            workers = {f"guard-worker-{i}" for i in range(ACTORS)}
            deadline = time.monotonic() + EXPORT_DEADLINE_S
            while True:
                per_node = {port: _scrape(port) for port in ports}
                consumed_per_node = {
                    p: _by_worker(s, "ray_mw_events_consumed_total") for p, s in per_node.items()
                }
                consumed = {w: v for by_worker in consumed_per_node.values() for w, v in by_worker.items()}
                if set(consumed) == workers and sum(consumed.values()) == len(stream.records):
                    break
                assert time.monotonic() < deadline, f"exported so far: {consumed_per_node}"
                time.sleep(2.0)
            driver_samples = parse_exposition(
                urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=10).read().decode()
            )
        finally:
            if driver.poll() is None:
                driver.send_signal(signal.SIGTERM)
            try:
                driver.wait(timeout=90)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait(timeout=10)

    # Every actor's series come from a different node's export port: the actors are spread, and each
    # node exports only its own actors.
    exporting_nodes = {w: p for p, by_worker in consumed_per_node.items() for w in by_worker}
    assert len(set(exporting_nodes.values())) == ACTORS, exporting_nodes
    nodes = list(per_node.values())
    merged: dict[str, float] = {k: v for samples in nodes for k, v in samples.items()}
    print(f"\nlive scrape: {len(ports)} nodes, actors on ports {exporting_nodes}, consumed {consumed}")

    # Every actor exports the pipeline's series: Redis up per worker (1), flagged counted per event.
    assert _by_worker(merged, "ray_mw_redis_up") == dict.fromkeys(workers, 1.0)
    assert set(_by_worker(merged, "ray_mw_worker_ready")) == workers
    assert sum(_by_worker(merged, "ray_mw_flagged_events_total").values()) == len(flagged)
    assert set(_by_worker(merged, "ray_mw_stage_seconds_bucket")) == workers
    # The driver's /metrics holds only the driver's view (no idle mw_redis_up 0 to drag min() down).
    assert driver_samples["mw_ray_workers_alive"] == ACTORS
    assert "mw_redis_up" not in driver_samples

    # What Prometheus stores after the PodMonitor's rename (ray_(mw_.+) -> $1), plus the driver's target.
    names = {re.sub(r"^ray_(mw_)", r"\1", key.split("{", 1)[0]) for key in merged} | {
        key.split("{", 1)[0] for key in driver_samples
    }
    missing = {
        title: sorted(promql_references(expr)[0] - names)
        for title, expr in _queries()
        if promql_references(expr)[0] - names
    }
    assert missing == {}, f"dashboard panels query metrics the live scrape lacks: {missing}"
