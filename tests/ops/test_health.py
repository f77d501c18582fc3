"""OpsServer serves /metrics, /healthz and /readyz on 127.0.0.1 and flips readiness with its callback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support import metrics as metric_reader
from worker.ops import metrics
from worker.ops.health import OpsServer

pytestmark = pytest.mark.timeout(30)


def _get(url: str) -> tuple[int, str, str]:
    """GET ``url`` -> (status, content type, body); 4xx/5xx are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


class Probe:
    """Mutable answers for the ready/live/status callbacks."""

    def __init__(self) -> None:
        self.ready = False
        self.live = True
        self.status: dict[str, object] = {"model_loaded": False, "assigned_partitions": []}


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe: Probe) -> Iterator[OpsServer]:
    with OpsServer(
        "127.0.0.1", 0, ready=lambda: probe.ready, live=lambda: probe.live, status=lambda: probe.status
    ) as ops:
        yield ops


def test_port_zero_binds_a_free_port_that_port_reports(server: OpsServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_endpoint_serves_the_registry_in_text_format(server: OpsServer) -> None:
    metrics.DUPLICATES_SKIPPED.inc(2)
    status, content_type, body = _get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    scraped = metric_reader.parse_exposition(body)
    assert (
        scraped["mw_duplicates_skipped_total"]
        == metric_reader.scrape_values()["mw_duplicates_skipped_total"]
        >= 2
    )
    assert "process_cpu_seconds_total" in scraped  # process collector registered on the private registry


def test_scrape_helper_reads_the_endpoint_and_counters_move(server: OpsServer) -> None:
    key = metric_reader.sample_key("mw_events_consumed_total", {"outcome": "dead_letter"})
    before = metric_reader.scrape(server.url + "/metrics")
    metrics.record_dead_letter("invalid_json")
    after = metric_reader.scrape(server.url + "/metrics")
    assert after[key] - before[key] == 1
    assert all(name.startswith("mw_") for name in after)


def test_readyz_is_503_with_a_reason_until_ready_then_200(server: OpsServer, probe: Probe) -> None:
    status, content_type, body = _get(server.url + "/readyz")
    assert (status, content_type) == (503, "application/json")
    assert json.loads(body)["reason"] == "model_not_loaded"

    probe.status = {"model_loaded": True, "assigned_partitions": []}
    assert json.loads(_get(server.url + "/readyz")[2])["reason"] == "no_partitions_assigned"

    probe.ready = True
    probe.status = {"model_loaded": True, "assigned_partitions": ["chat.events-0"]}
    status, _, body = _get(server.url + "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "detail": probe.status}

    probe.ready = False
    assert _get(server.url + "/readyz")[0] == 503


def test_healthz_follows_the_live_callback(server: OpsServer, probe: Probe) -> None:
    assert _get(server.url + "/healthz")[:2] == (200, "application/json")
    probe.live = False
    assert _get(server.url + "/healthz")[0] == 503


def test_a_raising_check_answers_503_naming_the_exception_type() -> None:
    def broken() -> bool:
        raise ConnectionError("detail that must not leak")

    with OpsServer("127.0.0.1", 0, ready=broken, live=broken) as ops:
        for path in ("/readyz", "/healthz"):
            status, _, body = _get(ops.url + path)
            assert status == 503
            assert json.loads(body)["reason"] == "check_failed: ConnectionError"
            assert "must not leak" not in body


def test_unknown_path_is_404(server: OpsServer) -> None:
    assert _get(server.url + "/nope")[0] == 404


def test_stop_releases_the_port_and_is_idempotent() -> None:
    ops = OpsServer("127.0.0.1", 0).start()
    port = ops.port
    ops.stop()
    ops.stop()
    with OpsServer("127.0.0.1", port) as again:  # rebinding the same port proves it was released
        assert _get(again.url + "/healthz")[0] == 200
