"""Outages stop the stream instead of being judged away or retried in a spin; a lone poison item is still one
dead letter.

The engine is the real ``GuardEngine`` on the trained tiny checkpoint, made to fail for real: its weights
are overwritten with NaN (every score comes out non-finite) and restored later. Failed deliveries are
injected at the real producer's ``send`` (it refuses records for a while). Broker, Redis and pipeline are
the real ones.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import orjson
import pytest
import torch
from kafka.errors import KafkaTimeoutError

from tests.stream.streaming import (
    WorkerThread,
    committed_offsets,
    fully_committed,
    produce,
    read_json,
    wait_for,
)
from tests.stream.test_poison import POISON, PoisonEngine
from tests.support import metrics as metric_reader
from worker.config import load_settings
from worker.engine.engine import GuardEngine
from worker.ops.health import OpsServer
from worker.stream import kafka_clients

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

EVENTS = 24
PARTITIONS = 2


def text_event(i: int, text: str | None = None) -> tuple[bytes, bytes]:
    event = {
        "event_id": f"o-{i}",
        "conversation_id": f"c-{i}",
        "messages": [{"role": "user", "content": text or f"how do I bake bread, attempt {i}?"}],
    }
    return f"c-{i}".encode(), orjson.dumps(event)


def readyz(ops: OpsServer) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(ops.url + "/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def outage_value(cause: str) -> float:
    return metric_reader.scrape_values()[metric_reader.sample_key("mw_outage", {"cause": cause})]


def outages_declared(cause: str) -> float:
    return metric_reader.scrape_values()[metric_reader.sample_key("mw_outages_total", {"cause": cause})]


def engine_retries(pipeline) -> int:
    outage = pipeline.status()["outage"] or {}
    return outage.get("engine", {}).get("failed_retries", 0)


def test_an_engine_outage_pauses_the_stream_commits_nothing_and_every_held_event_is_judged_after_recovery(
    make_settings, engine_settings_overrides
):
    # The shared prompt start's keys/values are cached across batches: computed with NaN weights they would
    # stay NaN after the repair, so this engine computes every prompt whole.
    overrides = {**engine_settings_overrides, "model__share_prompt_prefix": False}
    settings = make_settings(
        **overrides,
        batching__max_wait_ms=100,
        failures__retry_initial_s=0.2,
        failures__retry_max_s=1.0,
    )
    engine = GuardEngine.from_settings(load_settings(None, **overrides))
    healthy = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    produce(settings, [text_event(i) for i in range(EVENTS)], partitions=PARTITIONS)
    with torch.no_grad():
        for parameter in engine.model.parameters():
            parameter.fill_(float("nan"))  # the device's memory went bad: every forward pass is garbage
    declared_before = outages_declared("engine")
    worker = WorkerThread(settings, engine).start()
    ops = OpsServer(ready=lambda: worker.pipeline.ready, status=worker.pipeline.status).start()
    try:
        wait_for(
            lambda: engine_retries(worker.pipeline) >= 3, timeout_s=180, what="retries", workers=[worker]
        )
        status = worker.pipeline.status()
        code, body = readyz(ops)
        assert code == 503 and body["reason"] == "engine_outage", body
        assert status["ready"] is False and "engine" in status["outage"]
        assert status["paused"] == len(status["assigned"]) > 0  # stopped consuming
        assert outage_value("engine") == 1
        assert outages_declared("engine") == declared_before + 1
        assert all(
            offset is None
            for offset in committed_offsets(settings, settings.topics.events, PARTITIONS).values()
        )
        assert read_json(settings, settings.topics.dlq) == []  # nothing judged away
        assert read_json(settings, settings.topics.verdicts) == []

        engine.model.load_state_dict(healthy)  # the device is back
        wait_for(
            lambda: fully_committed(worker.pipeline, EVENTS),
            timeout_s=180,
            what="all judged",
            workers=[worker],
        )
        wait_for(lambda: readyz(ops)[0] == 200, timeout_s=30, what="ready again", workers=[worker])
        assert worker.pipeline.status()["outage"] is None
        assert outage_value("engine") == 0
    finally:
        ops.stop()
        worker.stop()
    verdicts = read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"o-{i}" for i in range(EVENTS))  # each once
    assert read_json(settings, settings.topics.dlq) == []  # no engine_error for any held event
    assert committed_offsets(settings, settings.topics.events, PARTITIONS) == {
        p: EVENTS // PARTITIONS for p in range(PARTITIONS)
    }


def test_a_lone_poison_item_is_one_dead_letter_not_an_outage(make_settings, engine_settings_overrides):
    # Batches of one: a poison item fails its whole batch, and only the probe tells it from an outage.
    settings = make_settings(
        **engine_settings_overrides, batching__max_size=1, failures__max_failed_batches=3
    )
    engine = PoisonEngine.from_settings(load_settings(None, **engine_settings_overrides))
    records = [text_event(i) for i in range(10)]
    records[3] = text_event(3, f"{POISON} one")
    records[4] = text_event(4, f"{POISON} two")
    produce(settings, records, partitions=1)
    declared_before = outages_declared("engine")
    worker = WorkerThread(settings, engine).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, 10), timeout_s=180, what="all done", workers=[worker]
        )
    finally:
        worker.stop()
    dead = read_json(settings, settings.topics.dlq)
    assert sorted((d["event_id"], d["reason"]) for d in dead) == [
        ("o-3", "engine_error"),
        ("o-4", "engine_error"),
    ]
    verdicts = read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"o-{i}" for i in range(10) if i not in (3, 4))
    assert worker.pipeline.counters["outages"] == 0
    assert outages_declared("engine") == declared_before


class FlakyProducer:
    """The real producer, except that ``send`` fails at once while ``failing`` is set (the broker refuses)."""

    def __init__(self, producer) -> None:
        self._producer = producer
        self.failing = True
        self.refused = 0

    def send(self, topic, **kwargs):
        if self.failing:
            self.refused += 1
            raise KafkaTimeoutError("simulated: the broker does not accept records")
        return self._producer.send(topic, **kwargs)

    def __getattr__(self, name):
        return getattr(self._producer, name)


def test_failing_deliveries_back_off_then_stop_the_stream_and_nothing_is_dropped(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    settings = make_settings(
        **engine_settings_overrides,
        failures__max_publish_attempts=2,
        failures__retry_initial_s=0.1,
        failures__retry_max_s=0.5,
    )
    produce(settings, [text_event(i) for i in range(12)], partitions=1)
    flaky: list[FlakyProducer] = []
    real_make_producer = kafka_clients.make_producer

    def make_flaky_producer(s, **overrides):
        flaky.append(FlakyProducer(real_make_producer(s, **overrides)))
        return flaky[-1]

    monkeypatch.setattr(kafka_clients, "make_producer", make_flaky_producer)
    worker = WorkerThread(settings, guard_engine).start()
    try:
        wait_for(
            lambda: "delivery" in (worker.pipeline.status()["outage"] or {}),
            timeout_s=120,
            what="delivery outage",
            workers=[worker],
        )
        status = worker.pipeline.status()
        assert status["ready"] is False and status["reason"] == "delivery_outage"
        assert outage_value("delivery") == 1
        refused_at_outage = flaky[0].refused
        time.sleep(2.0)
        # Backoff, not a spin: each of the 12 events is retried a handful of times in 2 s (delays up to 0.5 s).
        assert flaky[0].refused - refused_at_outage <= 12 * 8
        assert committed_offsets(settings, settings.topics.events, 1) == {0: None}
        flaky[0].failing = False  # the broker accepts records again
        wait_for(
            lambda: fully_committed(worker.pipeline, 12), timeout_s=120, what="delivered", workers=[worker]
        )
        wait_for(lambda: worker.pipeline.ready, timeout_s=30, what="ready again", workers=[worker])
        assert outage_value("delivery") == 0
    finally:
        worker.stop()
    verdicts = read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"o-{i}" for i in range(12))  # none dropped


class BrokenForSomeEngine(PoisonEngine):
    """Fails every batch holding a POISON item while ``broken`` is set, yet answers the probe (text) request."""

    broken = True

    def run(self, batch):
        if self.broken:
            return super().run(batch)
        return GuardEngine.run(self, batch)


def test_failed_batches_in_a_row_are_an_outage_even_when_the_probe_works(
    make_settings, engine_settings_overrides
):
    # Like an image tower gone bad while text still works: the probe passes, so only the run of failed
    # batches can tell. The first failed batch is taken for poison; the second reaches the limit.
    settings = make_settings(
        **engine_settings_overrides,
        batching__max_size=2,
        batching__max_wait_ms=200,
        failures__max_failed_batches=2,
        failures__retry_initial_s=0.2,
        failures__retry_max_s=0.5,
    )
    engine = BrokenForSomeEngine.from_settings(load_settings(None, **engine_settings_overrides))
    produce(settings, [text_event(i, f"{POISON} number {i}") for i in range(6)], partitions=1)
    worker = WorkerThread(settings, engine).start()
    try:
        wait_for(
            lambda: engine_retries(worker.pipeline) >= 2, timeout_s=120, what="retries", workers=[worker]
        )
        assert worker.pipeline.status()["reason"] == "engine_outage"
        assert len(read_json(settings, settings.topics.dlq)) == 2  # the first batch, taken for poison
        engine.broken = False
        wait_for(
            lambda: fully_committed(worker.pipeline, 6), timeout_s=120, what="all done", workers=[worker]
        )
    finally:
        worker.stop()
    assert len(read_json(settings, settings.topics.dlq)) == 2  # nothing held was judged away
    assert len(read_json(settings, settings.topics.verdicts)) == 4
