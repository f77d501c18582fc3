"""The embedded tansu broker and Redis server: loopback only, Redis with TTLs and restarts, the dev-services command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from worker.dev.services import (
    FREE_PORT_FLOOR,
    EmbeddedServices,
    ServicesError,
    dev_services_command,
    ephemeral_floor,
    free_port,
    kafka_answers,
    redis_answers,
)

pytestmark = pytest.mark.integration


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp{,6} (hex, as the kernel writes them)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = TCP_LISTEN
                found.add(address)
    return found


def _process_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "State:\tZ" in status:  # exited, waiting to be reaped by init
            return True
        time.sleep(0.05)
    return False


def test_both_servers_listen_on_127_0_0_1_only(services: EmbeddedServices) -> None:
    assert services.kafka_bootstrap == f"127.0.0.1:{services.kafka_port}"
    assert services.redis_url == f"redis://127.0.0.1:{services.redis_port}/0"
    # 0100007F is 127.0.0.1 in /proc's little-endian hex; 00000000 would be 0.0.0.0.
    assert _listening_addresses(services.kafka_port) == {"0100007F"}
    assert _listening_addresses(services.redis_port) == {"0100007F"}


def test_free_ports_come_from_below_the_ephemeral_range_and_are_bindable() -> None:
    floor = ephemeral_floor()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert FREE_PORT_FLOOR <= port < floor, "a port the OS may hand to another process's bind(0)"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_redis_set_get_with_ttl_expires(services: EmbeddedServices, make_settings) -> None:
    settings = make_settings()
    client = redis.Redis.from_url(settings.redis.url, socket_timeout=2)
    key = f"{settings.redis.key_prefix}verdict"
    try:
        assert client.set(key, b'{"decision": "safe"}', ex=1)
        assert client.get(key) == b'{"decision": "safe"}'
        assert 0 < client.pttl(key) <= 1000
        deadline = time.monotonic() + 15
        while client.get(key) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(key) is None
        assert client.ttl(key) == -2  # no such key
    finally:
        client.close()


def test_redis_restarts_on_the_same_port_and_starts_empty(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path) as embedded:
        port, first_pid = embedded.redis_port, embedded.redis_pid
        client = redis.Redis.from_url(embedded.redis_url, socket_timeout=1, socket_connect_timeout=1)
        client.set("k", "v")

        embedded.stop_redis()
        assert embedded.redis_pid is None
        assert not redis_answers(embedded.redis_url, timeout_s=0.5)
        with pytest.raises(redis.ConnectionError):
            client.get("k")

        embedded.start_redis()
        assert embedded.redis_port == port
        assert embedded.redis_pid not in (None, first_pid)
        assert client.get("k") is None  # no persistence: a restart is an empty cache
        client.close()


def test_broker_pause_freezes_it_until_resumed(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path) as embedded:
        embedded.pause_broker()
        assert not kafka_answers(embedded.kafka_bootstrap, timeout_s=1.0)
        embedded.resume_broker()
        assert kafka_answers(embedded.kafka_bootstrap, timeout_s=5.0)

        port = embedded.kafka_port
        embedded.stop_broker()
        assert not kafka_answers(embedded.kafka_bootstrap, timeout_s=0.5)
        embedded.start_broker()
        assert embedded.kafka_port == port
        assert kafka_answers(embedded.kafka_bootstrap, timeout_s=5.0)


def test_stop_ends_both_processes_and_can_be_repeated(tmp_path: Path) -> None:
    embedded = EmbeddedServices(tmp_path).start()
    pids = [embedded.broker_pid, embedded.redis_pid]
    embedded.pause_broker()  # a frozen broker must still be stopped
    embedded.stop()
    embedded.stop()
    assert all(pid is not None and _process_gone(pid) for pid in pids)
    assert (tmp_path / "tansu.log").read_text().strip()  # logs are kept


def test_a_broker_that_cannot_bind_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        embedded = EmbeddedServices(tmp_path, kafka_port=taken, startup_timeout_s=20)
        with pytest.raises(ServicesError) as failure:
            embedded.start()
    assert "tansu broker" in str(failure.value)
    assert str(tmp_path / "tansu.log") in str(failure.value)
    assert embedded.redis_pid is None  # nothing left running


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("moderation-worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


def _dev_services(action: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    return subprocess.run(
        [*_cli(), "dev-services", action, "--state-dir", str(state_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_dev_services_command_up_status_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    try:
        up = _dev_services("up", state_dir)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((state_dir / "services.json").read_text())
        bootstrap, redis_url = state["kafka_bootstrap"], state["redis_url"]
        assert f"export MW_KAFKA__BOOTSTRAP_SERVERS='[\"{bootstrap}\"]'" in up.stdout
        assert f"export MW_REDIS__URL='{redis_url}'" in up.stdout
        # The servers outlive the command that started them.
        assert kafka_answers(bootstrap) and redis_answers(redis_url)

        status = _dev_services("status", state_dir)
        assert status.returncode == 0, status.stdout + status.stderr

        # The exports written to services.env are what load_settings understands.
        script = (
            f"source {state_dir / 'services.env'} && {sys.executable} -c "
            "'from worker.config import load_settings; s = load_settings(); "
            "print(s.kafka.bootstrap_servers[0], s.redis.url)'"
        )
        printed = subprocess.run(
            ["bash", "-c", script], check=False, capture_output=True, text=True, timeout=60
        )
        assert printed.stdout.split() == [bootstrap, redis_url], printed.stderr

        # Idempotency checks run in-process (same function the command calls) to keep the test short.
        assert dev_services_command("up", state_dir) == 0
        assert "already running" in capsys.readouterr().out
        assert json.loads((state_dir / "services.json").read_text())["pids"] == state["pids"]

        down = _dev_services("down", state_dir)
        assert down.returncode == 0, down.stdout + down.stderr
        assert all(_process_gone(pid) for pid in state["pids"].values())
        assert dev_services_command("status", state_dir) == 1
        assert dev_services_command("down", state_dir) == 0  # already down: still fine
    finally:
        if (state_dir / "services.json").exists():
            _dev_services("down", state_dir)
    assert (state_dir / "tansu.log").exists() and (state_dir / "redis.log").exists()


def test_dev_services_up_keeps_its_ports_after_a_stale_restart_and_refuses_other_ports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    try:
        assert dev_services_command("up", state_dir) == 0
        first = json.loads((state_dir / "services.json").read_text())
        os.kill(first["pids"]["redis"], signal.SIGKILL)  # stale: one server died
        assert _process_gone(first["pids"]["redis"])
        capsys.readouterr()
        assert dev_services_command("up", state_dir) == 0
        assert "restarting on the same ports" in capsys.readouterr().out
        second = json.loads((state_dir / "services.json").read_text())
        assert second["ports"] == first["ports"]  # the exported env still points at the servers
        assert redis_answers(second["redis_url"])

        other = first["ports"]["kafka"] + 1
        assert dev_services_command("up", state_dir, kafka_port=other) == 1
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith("error:") and f"not on requested {other}" in out[0]
    finally:
        dev_services_command("down", state_dir)
