"""Helpers for the stream integration tests: build event streams, produce them, run workers, read outputs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from worker.config import Settings
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.stream.kafka_clients import ensure_topics, make_producer
from worker.stream.pipeline import StreamPipeline

EVENT_PARTITIONS = 4

# Malformed records and the dead-letter reason each must get (the foundation's decode contract).
MALFORMED: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"event_id": "m-missing", "conversation_id": "c"}', "missing_field"),
    (b'{"event_id": "m-empty", "conversation_id": "c", "messages": []}', "empty_conversation"),
    (
        b'{"event_id": "m-role", "conversation_id": "c", "messages": [{"role": "wizard", "content": "hi"}]}',
        "unknown_role",
    ),
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (b"", "empty_record"),
    (
        b'{"event_id": "m-first", "conversation_id": "c", "messages": [{"role": "assistant", "content": "hi"}]}',
        "first_message_not_user",
    ),
]


@dataclass
class Stream:
    """A generated input stream: records in order, and what each valid one is."""

    records: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value)
    valid_ids: set[str] = field(default_factory=set)
    image_ids: set[str] = field(default_factory=set)
    repeat_ids: set[str] = field(default_factory=set)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (index in records, expected reason)
    unique_valid: int = 0
    decisions: dict[str, str] = field(default_factory=dict)  # event_id -> the toy policy's decision


def build_stream(
    n: int,
    *,
    seed: int,
    repeat_ratio: float = 0.2,
    image_ratio: float = 0.1,
    malformed_ratio: float = 0.02,
    id_prefix: str = "ev",
) -> Stream:
    """``n`` records: ≈repeat_ratio repeats of earlier conversations (new ids), ≈image_ratio with images,
    ≈malformed_ratio malformed (cycling through MALFORMED). Deterministic in ``seed``."""
    n_malformed = round(n * malformed_ratio)
    n_repeats = round(n * repeat_ratio)
    n_unique = n - n_malformed - n_repeats
    n_images = min(n_unique, round(n * image_ratio))
    pool = synthetic_examples(n_unique * 3 + 50, seed=seed, split="train")
    with_image = [e for e in pool if e.has_image][:n_images]
    text_only = [e for e in pool if not e.has_image][: n_unique - len(with_image)]
    if len(with_image) < n_images or len(text_only) < n_unique - n_images:
        raise ValueError("synthetic pool too small for the requested mix")
    uniques = with_image + text_only
    # Spread images through the stream rather than front-loading them.
    uniques.sort(key=lambda e: e.event["event_id"])
    stream = Stream(unique_valid=len(uniques))
    ordered: list[tuple[str, Any]] = []
    for i, example in enumerate(uniques):
        ordered.append(("unique", example))
        # Interleave repeats of earlier conversations and malformed records.
        if (
            i
            and i % max(1, n_unique // max(1, n_repeats)) == 0
            and len([o for o in ordered if o[0] == "repeat"]) < n_repeats
        ):
            ordered.append(("repeat", uniques[(i * 7) % i]))
        if (
            i
            and i % max(1, n_unique // max(1, n_malformed)) == 0
            and len([o for o in ordered if o[0] == "bad"]) < n_malformed
        ):
            ordered.append(("bad", None))
    while len([o for o in ordered if o[0] == "repeat"]) < n_repeats:
        ordered.append(("repeat", uniques[len(ordered) % len(uniques)]))
    while len([o for o in ordered if o[0] == "bad"]) < n_malformed:
        ordered.append(("bad", None))
    bad_count = 0
    for index, (kind, example) in enumerate(ordered):
        if kind == "bad":
            value, reason = MALFORMED[bad_count % len(MALFORMED)]
            bad_count += 1
            stream.records.append((f"bad-{index}".encode(), value))
            stream.malformed.append((index, reason))
            continue
        event = dict(example.event)
        event["event_id"] = f"{id_prefix}-{seed}-{index:06d}"
        stream.records.append((event["conversation_id"].encode(), orjson.dumps(event)))
        stream.valid_ids.add(event["event_id"])
        stream.decisions[event["event_id"]] = example.decision
        if example.has_image:
            stream.image_ids.add(event["event_id"])
        if kind == "repeat":
            stream.repeat_ids.add(event["event_id"])
    return stream


def produce(
    settings: Settings, records: list[tuple[bytes | None, bytes]], *, partitions: int = EVENT_PARTITIONS
) -> None:
    """Create the events topic (``partitions``) and produce ``records``, spread round-robin over partitions."""
    ensure_topics(settings, [settings.topics.events], partitions=partitions)
    producer = make_producer(settings)
    try:
        for i, (key, value) in enumerate(records):
            producer.send(settings.topics.events, key=key, value=value, partition=i % partitions)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def _raw_consumer(settings: Settings, **extra: Any) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=list(settings.kafka.bootstrap_servers),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **extra,
    )


def read_all(settings: Settings, topic: str, *, timeout_s: float = 30.0) -> list[Any]:
    """Every record currently in ``topic`` (all partitions), read up to the high-water marks."""
    consumer = _raw_consumer(settings)
    try:
        deadline = time.monotonic() + timeout_s
        parts = None
        while parts is None and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                time.sleep(0.1)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            marks = {tp: consumer.highwater(tp) for tp in tps}
            if all(m is not None and consumer.position(tp) >= m for tp, m in marks.items()):
                return records
        raise TimeoutError(f"reading {topic} did not reach the high-water marks in {timeout_s}s")
    finally:
        consumer.close()


def read_json(settings: Settings, topic: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Values of every record in ``topic``, decoded."""
    return [orjson.loads(r.value) for r in read_all(settings, topic, **kwargs)]


def end_offsets(settings: Settings, topic: str, *, timeout_s: float = 20.0) -> dict[int, int]:
    """High-water mark of each partition of ``topic`` (tansu's end_offsets is broken: read to the end)."""
    consumer = _raw_consumer(settings)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
            marks = {tp: consumer.highwater(tp) for tp in tps}
            if all(m is not None for m in marks.values()) and all(
                consumer.position(tp) >= m for tp, m in marks.items()
            ):
                return {tp.partition: m for tp, m in marks.items()}
        raise TimeoutError(f"high-water marks of {topic} unknown after {timeout_s}s")
    finally:
        consumer.close()


def committed_offsets(
    settings: Settings, topic: str, partitions: int = EVENT_PARTITIONS
) -> dict[int, int | None]:
    """The consumer group's committed offset per partition (an OffsetFetch; does not join the group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=list(settings.kafka.bootstrap_servers),
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


class WorkerThread:
    """A StreamPipeline running in a daemon thread, stopped and joined with a timeout."""

    def __init__(self, settings: Settings, engine: Any, name: str = "worker", **kwargs: Any) -> None:
        self.pipeline = StreamPipeline(settings, engine, worker_name=name, **kwargs)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"pipeline-{name}", daemon=True)

    def _run(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:  # noqa: BLE001 — surfaced by stop()
            self.error = exc

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.pipeline.request_stop()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"pipeline {self.pipeline.worker_name} did not stop within {timeout_s}s")
        if self.error is not None:
            raise self.error


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, what: str, workers: list[WorkerThread] = ()
) -> None:
    """Poll ``condition`` every 50 ms; fail with ``what`` after ``timeout_s`` or when a worker died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in workers:
            if w.error is not None:
                raise AssertionError(
                    f"worker {w.pipeline.worker_name} failed while waiting for {what}"
                ) from w.error
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def outcomes_done(pipeline: StreamPipeline) -> int:
    """Events whose output was acknowledged."""
    return pipeline.counters["completed"]


def fully_committed(pipeline: StreamPipeline, expected: int) -> bool:
    """All ``expected`` events completed and their offsets committed."""
    return pipeline.counters["completed"] >= expected and pipeline.status()["all_committed"]
