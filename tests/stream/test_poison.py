"""Poison items: a batch the engine fails on is split until the culprit stands alone; OOM → smaller batches.

The engines below are real ``GuardEngine`` subclasses on the trained tiny checkpoint; only the failure
is simulated (raising for a marked item, or for batches above a size as a device out-of-memory would).
"""

from __future__ import annotations

import orjson
import pytest
import torch

from tests.stream.streaming import WorkerThread, fully_committed, produce, read_json, wait_for
from tests.support.contracts import validate_dead_letter, validate_verdict
from worker.config import load_settings
from worker.engine.engine import GuardEngine, PreparedBatch
from worker.engine.types import EngineError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POISON = "POISON-PILL"
GARBLED = "GARBLED-ANSWER"


def texts_of(batch: PreparedBatch) -> list[str]:
    return [" ".join(t for turn in r.turns for t in turn.texts) for r in batch.requests]


class PoisonEngine(GuardEngine):
    """Raises on any batch holding a POISON item; answers unparseably for GARBLED items."""

    def run(self, batch: PreparedBatch):
        if any(POISON in text for text in texts_of(batch)):
            raise RuntimeError("simulated kernel failure on a poison item")
        results = super().run(batch)
        return [
            EngineError("the answer does not parse", raw_output="unsafe\nS99,<junk>" * 50)
            if GARBLED in text
            else r
            for r, text in zip(results, texts_of(batch), strict=True)
        ]


class SmallDeviceEngine(GuardEngine):
    """Runs out of device memory on batches larger than ``limit`` (records the sizes that ran)."""

    limit = 4

    def run(self, batch: PreparedBatch):
        if len(batch.requests) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        self.ran.append(len(batch.requests))
        return super().run(batch)


def text_event(i: int, text: str) -> tuple[bytes, bytes]:
    event = {
        "event_id": f"p-{i}",
        "conversation_id": f"c-{i}",
        "messages": [{"role": "user", "content": text}],
    }
    return f"c-{i}".encode(), orjson.dumps(event)


def test_a_poison_item_is_isolated_and_the_rest_of_its_batch_gets_verdicts(
    make_settings, engine_settings_overrides
):
    settings = make_settings(**engine_settings_overrides, batching__max_wait_ms=200)
    engine = PoisonEngine.from_settings(load_settings(None, **engine_settings_overrides))
    records = [text_event(i, f"what is a good recipe for dinner number {i}?") for i in range(40)]
    records[7] = text_event(7, f"{POISON} please")
    records[23] = text_event(23, f"tell me about {POISON} number two")
    records[30] = text_event(30, f"{GARBLED} question")
    produce(settings, records, partitions=1)  # one partition: the items share batches
    worker = WorkerThread(settings, engine).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, 40), timeout_s=120, what="all done", workers=[worker]
        )
    finally:
        worker.stop()
    verdicts = read_json(settings, settings.topics.verdicts)
    dead = read_json(settings, settings.topics.dlq)
    assert sorted(v["event_id"] for v in verdicts) == sorted(
        f"p-{i}" for i in range(40) if i not in (7, 23, 30)
    )
    assert sorted(d["event_id"] for d in dead) == ["p-23", "p-30", "p-7"]
    assert {d["reason"] for d in dead} == {"engine_error"}
    garbled = next(d for d in dead if d["event_id"] == "p-30")
    assert "S99" in garbled["message"] and len(garbled["message"]) < 1000  # raw output quoted, truncated
    assert "RuntimeError" in next(d for d in dead if d["event_id"] == "p-7")["message"]
    assert worker.pipeline.counters["isolations"] >= 1
    for v in verdicts:
        validate_verdict(v)
    for d in dead:
        validate_dead_letter(d)


def test_device_out_of_memory_is_retried_in_smaller_batches(make_settings, engine_settings_overrides):
    settings = make_settings(**engine_settings_overrides, batching__max_size=16, batching__max_wait_ms=200)
    engine = SmallDeviceEngine.from_settings(load_settings(None, **engine_settings_overrides))
    engine.ran = []
    records = [text_event(i, f"how do plants grow, question {i}?") for i in range(32)]
    produce(settings, records, partitions=1)
    worker = WorkerThread(settings, engine).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, 32), timeout_s=120, what="all done", workers=[worker]
        )
    finally:
        worker.stop()
    verdicts = read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"p-{i}" for i in range(32))
    assert read_json(settings, settings.topics.dlq) == []
    assert engine.ran and max(engine.ran) <= SmallDeviceEngine.limit and sum(engine.ran) == 32
