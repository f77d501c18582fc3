"""Shared pytest fixtures: the embedded broker and Redis, per-test settings; the support plugins.

- ``services`` (session): one tansu broker and one Redis server on free 127.0.0.1 ports for the whole
  run, always stopped at the end; their log directory is printed in the summary (with log tails when
  a test failed).
- ``make_settings(**overrides)`` (function): ``Settings`` pointed at ``services`` with topic names, a
  consumer group and a Redis key prefix unique to the test, and fast group timeouts.

Plugins from ``tests/support``: the network guard (autouse: nothing leaves 127.0.0.0/8 and ::1), the tiny
checkpoints and session engines, the session's Ray instance and the multi-node cluster.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings, load_settings
from worker.dev.services import EmbeddedServices

pytest_plugins = [
    "pytester",
    "tests.support.summary",
    "tests.support.xdist_groups",
    "tests.support.network_guard",
    "tests.support.engines",
    "tests.support.ray_cluster",
    "tests.support.multinode",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- embedded services ------------------------------------------------------------------------------

_started_services: list[EmbeddedServices] = []


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServices]:
    """The tansu broker and Redis on free 127.0.0.1 ports, shared by the session, stopped at its end."""
    embedded = EmbeddedServices(tmp_path_factory.mktemp("services"))
    _started_services.append(embedded)
    embedded.start()  # raises ServicesError with the log's tail on failure
    try:
        yield embedded
    finally:
        embedded.stop()


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ["<no log>"]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Where the embedded services' logs are (and their tails when a test failed), for the run's summary."""
    from tests.support.summary import section_lines  # a plugin (above): imported by pytest, not at import

    lines = section_lines("embedded services")
    for embedded in _started_services:
        seconds = f"{embedded.startup_seconds:.2f} s" if embedded.startup_seconds is not None else "failed"
        lines.append(f"start-up {seconds}; logs kept in {embedded.state_dir}")
        if exitstatus != 0:
            for log_path in (embedded.broker_log, embedded.redis_log):
                lines.append(f"--- tail of {log_path}")
                lines.extend(_tail(log_path))


class SettingsFactory:
    """Builds ``Settings`` for one test: ``factory(**overrides)`` with ``load_settings``-style keys
    (``kafka__group_id="g"``). Every call in a test shares the same topics, group and key prefix."""

    def __init__(self, services: EmbeddedServices, suffix: str) -> None:
        self.suffix = suffix
        self.base: dict[str, Any] = {
            "kafka__bootstrap_servers": [services.kafka_bootstrap],
            "kafka__group_id": f"mw-test-{suffix}",
            # tansu holds a group join for about session_timeout/2: keep rebalances short in tests.
            "kafka__session_timeout_ms": 3000,
            "kafka__heartbeat_interval_ms": 1000,
            "topics__events": f"chat.events.{suffix}",
            "topics__flagged": f"moderation.flagged.{suffix}",
            "topics__verdicts": f"moderation.verdicts.{suffix}",
            "topics__dlq": f"moderation.dlq.{suffix}",
            "topics__review": f"moderation.review.{suffix}",
            "redis__url": services.redis_url,
            # One Redis serves the session: a per-test prefix keeps cached verdicts from leaking across tests.
            "redis__key_prefix": f"mw:test:{suffix}:",
        }

    def __call__(self, **overrides: Any) -> Settings:
        return load_settings(None, **{**self.base, **overrides})


KAFKA_CLIENTS = ["kafka-python", "confluent-kafka"]


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """``kafka.client`` for a delivery test: a test that asks for it runs once per Kafka client library."""
    return request.param


@pytest.fixture
def make_settings(services: EmbeddedServices, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """``make_settings(**overrides) -> Settings`` pointed at the embedded services, unique per test.

    ``MW_*`` variables from the developer's shell (e.g. after ``dev-services up``) are removed for the
    test, so every run sees the same configuration.
    """
    for key in list(os.environ):
        if key == "MW_CONFIG" or (key.startswith("MW_") and "__" in key):
            monkeypatch.delenv(key)
    return SettingsFactory(services, uuid.uuid4().hex[:12])


# -- unit vs integration ----------------------------------------------------------------------------

# Fixtures that start a server (broker, Redis, Ray, Serve, an HTTP server) — a test using one, directly
# or through another fixture, is an integration test; so is one loading a tiny checkpoint.
SERVER_FIXTURES = frozenset(
    {
        "services",
        "make_settings",
        "ray_cluster",
        "serve_http",
        "multinode_cluster",
        "image_server",
        "tls_image_server",
    }
)


# Under pytest-xdist (`scripts/test.sh` runs `-n 3 --dist loadgroup`) every test on a Ray instance runs in one
# worker: that worker's one session Ray is shared as without xdist, and two workers never start Ray (≈0.9 GB
# and a CPU-hungry start each) or a multi-node cluster at the same time.
RAY_FIXTURES = frozenset({"ray_cluster", "serve_http", "multinode_cluster"})

# Fixtures that need a trained tiny checkpoint: on an empty cache it trains for minutes (in the background,
# started by scripts/test.sh), and a test asking for one waits for it.
TRAINED_FIXTURES = frozenset(
    {
        "tiny_model_dir",
        "tiny_text_guard_dir",
        "tiny_lg4_dir",
        "engine_settings_overrides",
        "guard_engine",
        "trained_engine",
        "text_guard_engine",
    }
)


def _run_order(item: pytest.Item) -> int:
    """Tests that need no trained checkpoint first (they run while a cold cache trains), then the Ray group
    (the longest chain: one worker runs it test after test), then the reliability runs (minutes each), then
    the rest; the sort is stable, so each part keeps the collection order."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if RAY_FIXTURES & fixtures:
        return 1
    if not TRAINED_FIXTURES & fixtures:
        return 0
    return 2 if item.path.parent.name == "reliability" else 3


# tryfirst: before pytest-xdist's own hook, which reads the xdist_group marks (added here) into node ids.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that needs a server or a tiny checkpoint (by its fixtures) and every
    ``slow`` exploration, so that ``-m "not integration"`` runs the logic tests alone. Tests that start a
    server or a process themselves carry the marker in their module or on the function. Put the Ray tests
    in one xdist group and order the run (``_run_order``)."""
    from tests.support.engines import MODEL_FIXTURES

    needs = SERVER_FIXTURES | MODEL_FIXTURES
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if needs.intersection(fixtures) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
        if RAY_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=_run_order)
