"""``moderation-worker run --ray`` as a real process joining the session's Ray instance; SIGTERM drains it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stream.streaming import build_stream, produce, read_json

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_ray_starts_a_worker_on_the_cluster_and_exits_0_after_draining_on_sigterm(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        model__path=str(tiny_model_dir),
        ray__address=ray_cluster.address,
        ray__num_workers=1,
        ops__port=0,
        shutdown__drain_timeout_s=15.0,
        logging__format="json",
    )
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(settings.masked()))
    stderr_path = tmp_path / "driver.log"
    stream = build_stream(30, seed=4, repeat_ratio=0.0, image_ratio=0.0, malformed_ratio=0.0, id_prefix="cli")
    produce(settings, stream.records, partitions=2)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    with stderr_path.open("w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--ray", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while "all 1 guard workers ready" not in stderr_path.read_text():
                assert driver.poll() is None, stderr_path.read_text()[-3000:]
                assert time.monotonic() < deadline, stderr_path.read_text()[-3000:]
                time.sleep(0.3)
            deadline = time.monotonic() + 60
            while {v["event_id"] for v in read_json(settings, settings.topics.verdicts)} != stream.valid_ids:
                assert time.monotonic() < deadline, stderr_path.read_text()[-4000:]
                time.sleep(0.5)
            driver.send_signal(signal.SIGTERM)
            returncode = driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=10)
    log = stderr_path.read_text()
    assert returncode == 0, log[-3000:]
    assert "stopping 1 guard workers" in log
    assert '"drained=True"' in log or "stopped (drained=True)" in log
