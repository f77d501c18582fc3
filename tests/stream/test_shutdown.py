"""``moderation-worker run`` as a subprocess: SIGTERM while events flow → drain, commit, exit 0 in time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import yaml

from tests.stream.streaming import (
    EVENT_PARTITIONS,
    build_stream,
    committed_offsets,
    produce,
    read_all,
    read_json,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DRAIN_TIMEOUT_S = 20.0


def test_sigterm_during_flow_drains_commits_and_exits_zero(
    make_settings, engine_settings_overrides, tmp_path, kafka_client
):
    settings = make_settings(
        kafka__client=kafka_client,
        **engine_settings_overrides,
        shutdown__drain_timeout_s=DRAIN_TIMEOUT_S,
        ops__port=0,
        # Small batches keep the stream flowing for a while on the tiny model.
        batching__max_size=4,
        kafka__max_poll_records=16,
    )
    stream = build_stream(3000, seed=21, repeat_ratio=0.0)
    produce(settings, stream.records)
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(read_all(settings, settings.topics.verdicts)) < 100:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            rc = proc.wait(timeout=DRAIN_TIMEOUT_S + 30)
            took = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    output = log_path.read_text()
    assert rc == 0, output[-3000:]
    assert took < DRAIN_TIMEOUT_S + 15, f"exit took {took:.1f}s"

    # Committed offsets match the outputs: every offset below the commit point has a verdict or a dead
    # letter, and nothing at or beyond it was published (a clean drain completes and commits all it started).
    outputs = read_json(settings, settings.topics.verdicts) + read_json(settings, settings.topics.dlq)
    done: dict[int, set[int]] = defaultdict(set)
    for record in outputs:
        done[record["source"]["partition"]].add(record["source"]["offset"])
    committed = committed_offsets(settings, settings.topics.events)
    assert sum(c or 0 for c in committed.values()) < len(stream.records), (
        "stopped before the end of the stream"
    )
    for partition in range(EVENT_PARTITIONS):
        upto = committed[partition] or 0
        assert done[partition] == set(range(upto)), f"partition {partition}"
