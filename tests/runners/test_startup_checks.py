"""Startup dependencies are probed before the model loads; a missing one is one line naming its key, exit 2."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from worker.config import load_settings
from worker.ops.preflight import StartupError, check_kafka, check_redis


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening, held for the test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other server is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _worker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=base | env,
        check=False,
    )


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


def test_run_against_a_closed_broker_port_stops_before_loading_the_model(closed_port):
    # model.path does not exist: had the model been loaded first, the error would name model.path.
    out = _worker(
        "run",
        env={
            "MW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}",
            "MW_MODEL__PATH": "/nonexistent/guard",
            "MW_OPS__PORT": "0",
        },
    )
    assert out.returncode == 2
    line = _one_error_line(out)
    assert "kafka.bootstrap_servers" in line and f"127.0.0.1:{closed_port}" in line and "refused" in line


def test_run_with_a_reachable_broker_and_no_weights_names_model_path(busy_port):
    out = _worker(
        "run",
        env={
            "MW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{busy_port}",
            "MW_MODEL__PATH": "/nonexistent/guard",
            "MW_OPS__PORT": "0",
        },
    )
    assert out.returncode == 2
    assert "model.path" in _one_error_line(out)


def test_run_with_a_busy_ops_port_names_ops_port(busy_port, tmp_path):
    out = _worker(
        "run",
        env={
            "MW_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{busy_port}",
            "MW_MODEL__PATH": str(tmp_path),
            "MW_OPS__PORT": str(busy_port),
        },
    )
    assert out.returncode == 2
    line = _one_error_line(out)
    assert "ops.port" in line and "already in use" in line


def test_serve_on_a_busy_port_is_one_line_naming_serve_port(busy_port, tmp_path):
    out = _worker("serve", env={"MW_SERVE__PORT": str(busy_port), "MW_MODEL__PATH": str(tmp_path)})
    assert out.returncode == 2
    line = _one_error_line(out)
    assert "serve.port" in line and str(busy_port) in line and "already in use" in line


def test_serve_with_an_unreachable_ray_address_names_ray_address(closed_port, tmp_path):
    with socket.socket() as probe:  # a port free for serve itself
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    out = _worker(
        "serve",
        env={
            "MW_SERVE__PORT": str(free_port),
            "MW_RAY__ADDRESS": f"127.0.0.1:{closed_port}",
            "MW_MODEL__PATH": str(tmp_path),
        },
    )
    assert out.returncode == 2
    assert "ray.address" in _one_error_line(out)


def test_any_reachable_bootstrap_server_is_enough(closed_port, busy_port):
    settings = load_settings(
        None, kafka__bootstrap_servers=[f"127.0.0.1:{closed_port}", f"127.0.0.1:{busy_port}"]
    )
    check_kafka(settings)
    settings.kafka.bootstrap_servers = [f"127.0.0.1:{closed_port}"]
    with pytest.raises(StartupError, match=r"kafka\.bootstrap_servers"):
        check_kafka(settings)


def test_an_unreachable_redis_is_one_warning_saying_the_worker_runs_uncached(closed_port, caplog):
    settings = load_settings(None, redis__url=f"redis://user:pw@127.0.0.1:{closed_port}/0")
    with caplog.at_level(logging.WARNING):
        message = check_redis(settings)
    assert message is not None and "redis.url" in message and "running uncached" in message
    assert "pw@" not in message
    assert [r.reason for r in caplog.records if r.name == "worker.ops.preflight"] == ["cache_unavailable"]
    settings.redis.enabled = False
    assert check_redis(settings) is None


def test_joining_a_ray_cluster_does_not_need_the_weights_on_this_machine(busy_port, monkeypatch):
    from worker.ops.preflight import check_run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = load_settings(
        None,
        kafka__bootstrap_servers=[f"127.0.0.1:{busy_port}"],
        model__path="/nonexistent",
        ray__address=f"127.0.0.1:{busy_port}",
        ops__port=0,
    )
    check_run(settings, on_ray=True)  # the cluster's nodes load the model
    with pytest.raises(StartupError, match=r"model\.path"):
        check_run(settings)  # a local worker loads it here
