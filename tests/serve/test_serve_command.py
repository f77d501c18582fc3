"""``moderation-worker serve`` as Kubernetes runs it: a real subprocess on free 127.0.0.1 ports.

Start-up answers ``/readyz`` (503 while the model loads) instead of leaving probes hanging; SIGTERM drains
in-flight requests, stops Serve and Ray in order and exits 0 (a pod stop must not look like a crash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from worker.dev.services import free_port

# xdist_group: `serve` starts a local Ray instance; in the worker that runs every other Ray test (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray")]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300  # a shared 2-core machine: Ray + Serve + model can take a minute or more
PROBE_TIMEOUT_S = 10
HUNG_PROBES = 2  # probes in a row that time out: a hang (readyz blocked until the model loads), not load


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, orjson.loads(body)
        except orjson.JSONDecodeError:
            return exc.code, {"proxy": body.decode(errors="replace")}


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_serve_answers_readyz_during_start_up_and_exits_0_on_sigterm_after_draining(tiny_model_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")} | {
        "PYTHONPATH": str(REPO),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MW_MODEL__PATH": str(tiny_model_dir),
        "MW_MODEL__DEVICE": "cpu",
        "MW_REDIS__ENABLED": "false",
        "MW_SERVE__PORT": str(port),
        "MW_SERVE__NUM_GPUS": "0",
    }
    stderr_path = tmp_path / "serve.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        answers: list[int] = []
        timeouts = 0  # in a row: one slow answer on a loaded machine is not a hang, two are
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(base + "/readyz")
            except (ConnectionError, urllib.error.URLError, TimeoutError) as exc:
                if isinstance(getattr(exc, "reason", exc), TimeoutError) or isinstance(exc, TimeoutError):
                    timeouts += 1
                    if timeouts >= HUNG_PROBES:
                        pytest.fail(
                            f"/readyz hung during start-up instead of answering ({exc}, {timeouts} in a row)"
                        )
                    continue
                time.sleep(0.5)  # the proxy is not listening yet
                continue
            timeouts = 0
            answers.append(status)
            if "proxy" in body:  # Serve's proxy before the app's route exists: a plain-text 404/503, at once
                assert status in (404, 503), (status, body)
                time.sleep(0.5)
                continue
            assert status in (200, 503), (status, body)
            if status == 503:
                assert body["status"] in ("loading", "not_ready") or "error" in body, body
            if status == 200:
                break
            time.sleep(0.5)
        assert answers and answers[-1] == 200, (answers, stderr_path.read_text()[-3000:])

        # Unknown routes and methods use the error shape too.
        status, body = _get(base + "/nope")
        assert status == 404 and body["error"]["reason"] == "not_found" and "detail" not in body

        event = {
            "event_id": "drain-1",
            "conversation_id": "c",
            "created_at": "2026-12-01T00:00:00Z",
            "messages": [{"role": "user", "content": "hello"}],
        }
        in_flight: list[tuple[int, dict]] = []
        sender = threading.Thread(
            target=lambda: in_flight.append(_post(base + "/v1/moderate", orjson.dumps([event] * 32)))
        )
        sender.start()
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sender.join(120)
        exit_code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    stderr_text = stderr_path.read_text(errors="replace")
    assert exit_code == 0, stderr_text[-3000:]
    assert "Traceback" not in stderr_text and "graceful_shutdown failed" not in stderr_text, stderr_text[
        -3000:
    ]
    assert "\x1b[" not in stderr_text, "ANSI escapes (Ray's worker prefixes) in the log"
    assert in_flight and in_flight[0][0] == 200, in_flight  # the request in flight at SIGTERM was answered
    assert len(in_flight[0][1]) == 32
