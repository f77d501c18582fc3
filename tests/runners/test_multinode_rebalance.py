"""A multi-node Ray cluster loses a node mid-stream and loses nothing.

``moderation-worker run --ray`` (a real driver subprocess, ``RAY_ADDRESS`` = the cluster) on a loopback
``ray.cluster_utils.Cluster``: a head without GPU and two worker nodes with one fake GPU each, so the two
GuardWorker actors sit on different nodes. When about a third of the stream is answered, one worker node
is killed (``remove_node(allow_graceful=False)``: its raylet and the actor's process die with it). The
surviving actor's consumer keeps its partitions across the rebalance and takes the dead one's; the dead
actor's restart waits for a GPU that no longer exists. The test ends when every input offset has a
verdict or a dead letter and the group's committed offsets are at the end offsets; the audit (events,
answered, lost, duplicates, time to recover) is printed at the end of the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.multinode import MultiNodeCluster
from tests.reliability.accounting import account, env_int, wait_until_answered, write_config
from tests.stream.streaming import build_stream, committed_offsets, end_offsets, produce
from worker.stream.kafka_clients import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

PARTITIONS = 4
EVENTS = env_int("MW_MULTINODE_EVENTS", 1500)
KILL_AT = 0.3  # fraction of the stream answered when the node dies


class RayDriver:
    """``python -m worker run --ray --config CFG`` joined to the cluster, its output kept in a log."""

    def __init__(self, config: Path, address: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
        env["RAY_ADDRESS"] = address
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--ray", "--config", str(config)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def stop(self, timeout_s: float) -> int:
        """SIGTERM (drain) and wait; SIGKILL after ``timeout_s``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._fh.close()
        return int(self.proc.returncode)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def test_a_node_dies_mid_stream_and_every_offset_is_answered(
    multinode_cluster: MultiNodeCluster,
    multinode_audit: list[str],
    make_settings: Any,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        model__path=str(tiny_model_dir),
        model__device="cpu",
        ops__port=0,
        ray__num_workers=2,
        ray__num_gpus_per_worker=1.0,
        shutdown__drain_timeout_s=20,
        batching__max_wait_ms=20,
        batching__max_size=8,
    )
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    stream = build_stream(
        EVENTS, seed=81, repeat_ratio=0.2, image_ratio=0.0, malformed_ratio=0.01, id_prefix="node"
    )
    produce(settings, stream.records, partitions=PARTITIONS)
    config = write_config(settings, tmp_path / "driver.yaml")
    driver = RayDriver(config, multinode_cluster.address, tmp_path / "driver.log")
    try:
        deadline = time.monotonic() + 600
        answered = 0
        while answered < EVENTS * KILL_AT:
            assert driver.proc.poll() is None, f"driver exited early:\n{driver.tail()}"
            assert time.monotonic() < deadline, f"no progress to {KILL_AT:.0%}:\n{driver.tail()}"
            time.sleep(1.0)
            snapshot = account(settings)
            answered = snapshot.inputs - len(snapshot.lost)
        at_kill = committed_offsets(settings, settings.topics.events, PARTITIONS)
        victim = multinode_cluster.nodes[0]
        multinode_cluster.kill_node(victim, graceful=False)
        killed = time.monotonic()
        ends = end_offsets(settings, settings.topics.events)
        # Recovered: every partition (the dead worker's too) committed past where it stood at the kill.
        recovered_after = None
        while recovered_after is None and time.monotonic() - killed < 600:
            now = committed_offsets(settings, settings.topics.events, PARTITIONS)
            if all((now[p] or 0) > (at_kill[p] or 0) or (now[p] or 0) >= ends[p] for p in range(PARTITIONS)):
                recovered_after = time.monotonic() - killed
            else:
                time.sleep(0.5)
        result = wait_until_answered(settings, EVENTS, timeout_s=600)
        commit_deadline = time.monotonic() + 120
        while committed_offsets(settings, settings.topics.events, PARTITIONS) != ends:
            assert time.monotonic() < commit_deadline, (
                committed_offsets(settings, settings.topics.events),
                ends,
            )
            time.sleep(1.0)
    finally:
        code = driver.stop(timeout_s=120)
    assert recovered_after is not None, f"partitions never moved again after the node died:\n{driver.tail()}"
    assert result.lost == [], f"lost {len(result.lost)} offsets, e.g. {result.lost[:8]}\n{driver.tail()}"
    assert code == 0, driver.tail()
    multinode_audit.append(
        f"node killed at {answered}/{EVENTS} answered (3 nodes, 2 GPU workers): {result.line()}, "
        f"answered {result.verdicts + result.dead_letters}, time to recover {recovered_after:.1f}s "
        f"(kill → every partition committing again)"
    )
