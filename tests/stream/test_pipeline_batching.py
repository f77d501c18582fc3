"""The pipeline's batcher follows the engine: modalities share batches only when the engine says it can,
and items are batched by the length of their conversation."""

from __future__ import annotations

import copy

from kafka.structs import TopicPartition

from worker.config import load_settings
from worker.contracts.events import Turn
from worker.stream.pipeline import StreamPipeline, WorkItem


def _item(offset: int, text: str) -> WorkItem:
    item = WorkItem(TopicPartition("t", 0), offset, 0, b"", None, 0, 0.0)
    item.event = type("Event", (), {"turns": (Turn("user", (text,)),)})()  # the batcher reads turns only
    return item


def _batches(engine, **settings) -> list:
    pipeline = StreamPipeline(load_settings(None, batching__max_wait_ms=0, **settings), engine)
    batcher = pipeline._batcher
    batcher.add("t", "text", _item(0, "hello"))
    batcher.add("i", "image", _item(1, "what is this?"))
    return batcher.ready()


def test_modalities_share_a_batch_only_when_configured_and_the_engine_mixes_them(guard_engine):
    mixing = copy.copy(guard_engine)
    # A class attribute, so this also overrides the engine's read-only property.
    mixing.__class__ = type("MixingEngine", (type(guard_engine),), {"mixes_modalities": True})
    # Mixing is opt-in: an engine that can still gets split batches by default.
    assert sorted(b.modality for b in _batches(mixing)) == ["image", "text"]
    [batch] = _batches(mixing, batching__mix_modalities=True)
    assert batch.modality == "mixed" and len(batch.entries) == 2
    not_mixing = copy.copy(guard_engine)
    not_mixing.__class__ = type("SplitEngine", (type(guard_engine),), {"mixes_modalities": False})
    assert len(_batches(not_mixing, batching__mix_modalities=True)) == 2


def test_the_pipeline_batches_by_conversation_length(guard_engine):
    pipeline = StreamPipeline(
        load_settings(None, batching__max_size=2, batching__length_lookahead=2, batching__max_wait_ms=60_000),
        guard_engine,
    )
    batcher = pipeline._batcher
    for offset, text in enumerate(["x" * 900, "hi", "y" * 950, "ok"]):
        batcher.add(str(offset), "text", _item(offset, text))
    [first] = batcher.ready()
    # The oldest item (900 chars) leaves with the other long one, not with a one-liner.
    assert [e.leader.offset for e in first.entries] == [0, 2]
