"""Replays after a crash are quiet: a record whose answer the broker already acknowledged is not published again.

A crash leaves answered records uncommitted (they wait behind a slower one of their partition). Here the
group's committed offsets are rewound to 0 after a complete run — exactly what a successor finds after such
a crash — and a second worker consumes the whole stream again.
"""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from tests.stream.streaming import (
    EVENT_PARTITIONS,
    WorkerThread,
    build_stream,
    committed_offsets,
    end_offsets,
    fully_committed,
    produce,
    read_json,
    wait_for,
)
from worker.ops import metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def rewind_group(settings, topic: str) -> None:
    """Commit offset 0 on every partition for the worker's group (no member is running)."""
    consumer = KafkaConsumer(
        bootstrap_servers=list(settings.kafka.bootstrap_servers),
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(EVENT_PARTITIONS)]
        consumer.assign(tps)
        consumer.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
    finally:
        consumer.close(autocommit=False)


def run_to_the_end(settings, engine, name: str, expected: int) -> WorkerThread:
    worker = WorkerThread(settings, engine, name=name).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, expected), timeout_s=180, what=name, workers=[worker]
        )
    finally:
        worker.stop()
    return worker


def outputs(settings) -> int:
    return len(read_json(settings, settings.topics.verdicts)) + len(read_json(settings, settings.topics.dlq))


# confluent-kafka replays with markers only: what markers remove does not depend on the client.
@pytest.mark.parametrize(
    "markers,kafka_client",
    [(True, "kafka-python"), (False, "kafka-python"), (True, "confluent-kafka")],
    ids=["with-markers", "without-markers", "with-markers-confluent-kafka"],
)
def test_a_replayed_record_whose_answer_was_acknowledged_is_not_published_again(
    make_settings, engine_settings_overrides, guard_engine, markers, kafka_client
):
    settings = make_settings(
        kafka__client=kafka_client, **engine_settings_overrides, redis__published_markers=markers
    )
    stream = build_stream(120, seed=41)
    produce(settings, stream.records)
    run_to_the_end(settings, guard_engine, "first", len(stream.records))
    answered = outputs(settings)
    assert answered == len(stream.records)

    rewind_group(settings, settings.topics.events)
    assert set(committed_offsets(settings, settings.topics.events).values()) == {0}
    skipped_before = metrics.REPLAYS_SKIPPED._value.get()
    second = run_to_the_end(settings, guard_engine, "second", len(stream.records))

    assert second.pipeline.counters["consumed"] == len(stream.records)  # everything was consumed again
    assert committed_offsets(settings, settings.topics.events) == end_offsets(
        settings, settings.topics.events
    )
    if markers:
        assert second.pipeline.counters["replays_skipped"] == len(stream.records)
        assert metrics.REPLAYS_SKIPPED._value.get() - skipped_before == len(stream.records)
        assert outputs(settings) == answered  # not one duplicate
    else:  # the behaviour markers remove: every replayed record answered twice
        assert second.pipeline.counters["replays_skipped"] == 0
        assert outputs(settings) == 2 * answered
