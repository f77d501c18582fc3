"""The stream pipeline end to end: embedded tansu broker, real Redis, the trained tiny checkpoint, real engine."""

from __future__ import annotations

import time
from collections import Counter

import pytest

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
from tests.support.contracts import validate_dead_letter, validate_verdict
from worker.ops import metrics

# The acceptance stream. ~2,000 events take ≈15 s on the CPU tiny model (measured: see the report).
STREAM_EVENTS = 2000
STREAM_TIMEOUT_S = 300

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def metric(counter, **labels) -> float:
    return (counter.labels(**labels) if labels else counter)._value.get()


def batch_rows() -> float:
    return sum(metrics.BATCH_SIZE.labels(model="default", modality=m)._sum.get() for m in ("text", "image"))


def test_every_event_gets_exactly_one_verdict_or_dead_letter(
    make_settings, engine_settings_overrides, guard_engine, kafka_client
):
    settings = make_settings(kafka__client=kafka_client, **engine_settings_overrides)
    stream = build_stream(STREAM_EVENTS, seed=11)
    assert len(stream.records) == STREAM_EVENTS
    assert len(stream.image_ids) >= STREAM_EVENTS * 0.08 and len(stream.repeat_ids) >= STREAM_EVENTS * 0.18
    produce(settings, stream.records)
    rows_before = batch_rows()

    worker = WorkerThread(settings, guard_engine).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, STREAM_EVENTS),
            timeout_s=STREAM_TIMEOUT_S,
            what="all events committed",
            workers=[worker],
        )
    finally:
        worker.stop()

    verdicts = read_json(settings, settings.topics.verdicts)
    flagged = read_json(settings, settings.topics.flagged)
    dead = read_json(settings, settings.topics.dlq)

    # Exactly one verdict per valid event, none for anything else.
    ids = Counter(v["event_id"] for v in verdicts)
    assert set(ids) == stream.valid_ids
    assert max(ids.values()) == 1
    # Every unsafe verdict is in flagged, and flagged holds nothing else.
    unsafe_ids = {v["event_id"] for v in verdicts if v["decision"] == "unsafe"}
    assert unsafe_ids, "the trained tiny model flags the toy policy's unsafe examples"
    assert Counter(f["event_id"] for f in flagged) == Counter(unsafe_ids)
    # Every malformed record is in the DLQ with its expected reason, found by its source offset.
    by_source = {(d["source"]["partition"], d["source"]["offset"]): d for d in dead}
    assert len(dead) == len(stream.malformed)
    for index, reason in stream.malformed:
        partition, offset = index % EVENT_PARTITIONS, index // EVENT_PARTITIONS  # round-robin production
        assert by_source[(partition, offset)]["reason"] == reason
    # Image events got verdicts through the image path; identical items were classified once.
    assert stream.image_ids <= set(ids)
    assert batch_rows() - rows_before <= stream.unique_valid
    # Every output matches its contract.
    for v in verdicts + flagged:
        validate_verdict(v)
    for d in dead:
        validate_dead_letter(d)
    # Committed offsets reached the end of every partition.
    assert committed_offsets(settings, settings.topics.events) == end_offsets(
        settings, settings.topics.events
    )


def test_restart_after_a_clean_stop_reprocesses_nothing(
    make_settings, engine_settings_overrides, guard_engine
):
    settings = make_settings(**engine_settings_overrides)
    stream = build_stream(200, seed=12)
    produce(settings, stream.records)
    first = WorkerThread(settings, guard_engine, name="first").start()
    try:
        wait_for(
            lambda: fully_committed(first.pipeline, 200),
            timeout_s=120,
            what="first run done",
            workers=[first],
        )
    finally:
        first.stop()

    second = WorkerThread(settings, guard_engine, name="second").start()
    try:
        wait_for(lambda: second.pipeline.ready, timeout_s=60, what="second worker assigned", workers=[second])
        # Give it many poll rounds to (wrongly) re-read anything before the committed offsets.
        time.sleep(3.0)
    finally:
        second.stop()
    assert second.pipeline.counters["consumed"] == 0
    assert len(read_json(settings, settings.topics.verdicts)) == len(stream.valid_ids)


def test_a_second_worker_in_the_group_shares_the_partitions(
    make_settings, engine_settings_overrides, guard_engine, kafka_client
):
    settings = make_settings(kafka__client=kafka_client, **engine_settings_overrides)
    produce(settings, [])  # create the 4-partition topic before the workers subscribe
    a = WorkerThread(settings, guard_engine, name="a").start()
    b = WorkerThread(settings, guard_engine, name="b").start()
    try:

        def split_between_both() -> bool:
            pa, pb = set(a.pipeline.status()["assigned"]), set(b.pipeline.status()["assigned"])
            return bool(pa) and bool(pb) and not (pa & pb) and len(pa | pb) == EVENT_PARTITIONS

        wait_for(
            split_between_both, timeout_s=60, what="partitions split between two workers", workers=[a, b]
        )
        stream = build_stream(400, seed=13)
        produce(settings, stream.records)
        wait_for(
            lambda: (
                a.pipeline.counters["completed"] + b.pipeline.counters["completed"] >= 400
                and a.pipeline.status()["all_committed"]
                and b.pipeline.status()["all_committed"]
            ),
            timeout_s=120,
            what="both workers done",
            workers=[a, b],
        )
    finally:
        a.stop()
        b.stop()
    assert a.pipeline.counters["consumed"] > 0 and b.pipeline.counters["consumed"] > 0
    verdict_ids = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    assert set(verdict_ids) == stream.valid_ids and max(verdict_ids.values()) == 1


def test_redis_outage_mid_run_loses_nothing_and_cache_use_resumes(
    services, make_settings, engine_settings_overrides, guard_engine
):
    settings = make_settings(**engine_settings_overrides, redis__reconnect_interval_s=0.2)
    phase_a = build_stream(150, seed=14, id_prefix="a", malformed_ratio=0.0)
    phase_b = build_stream(150, seed=15, id_prefix="b", malformed_ratio=0.0)
    phase_c = build_stream(
        150, seed=14, id_prefix="c", malformed_ratio=0.0
    )  # phase A's content again: cache hits
    errors_before = metric(metrics.CACHE_REQUESTS, result="error")
    worker = WorkerThread(settings, guard_engine).start()
    redis_up_seen: list[float] = []
    try:
        produce(settings, phase_a.records)
        wait_for(
            lambda: fully_committed(worker.pipeline, 150), timeout_s=120, what="phase A", workers=[worker]
        )

        services.stop_redis()
        produce(settings, phase_b.records)

        def phase_b_done() -> bool:
            redis_up_seen.append(metrics.REDIS_UP._value.get())
            return fully_committed(worker.pipeline, 300)

        wait_for(phase_b_done, timeout_s=120, what="phase B during the outage", workers=[worker])
        errors_during = metric(metrics.CACHE_REQUESTS, result="error") - errors_before

        services.start_redis()
        lookups_before_c = metric(metrics.CACHE_REQUESTS, result="hit") + metric(
            metrics.CACHE_REQUESTS, result="miss"
        )
        produce(settings, phase_c.records)
        wait_for(
            lambda: fully_committed(worker.pipeline, 450), timeout_s=120, what="phase C", workers=[worker]
        )
    finally:
        if services.redis_pid is None:
            services.start_redis()
        worker.stop()

    assert errors_during > 0
    assert 0 in redis_up_seen
    assert metrics.REDIS_UP._value.get() == 1
    # After the restart the cache answers lookups again (hits if Redis kept phase A's entries, else misses).
    lookups_after = metric(metrics.CACHE_REQUESTS, result="hit") + metric(
        metrics.CACHE_REQUESTS, result="miss"
    )
    assert lookups_after - lookups_before_c >= len(phase_c.valid_ids) * 0.5
    ids = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    assert set(ids) == phase_a.valid_ids | phase_b.valid_ids | phase_c.valid_ids


def test_backpressure_pauses_above_the_in_flight_bound_and_resumes_below(
    make_settings, engine_settings_overrides, guard_engine, kafka_client
):
    settings = make_settings(
        kafka__client=kafka_client,
        **engine_settings_overrides,
        batching__max_in_flight=16,
        batching__resume_below=4,
        kafka__max_poll_records=8,
    )
    stream = build_stream(300, seed=16, malformed_ratio=0.0)
    produce(settings, stream.records)
    worker = WorkerThread(settings, guard_engine).start()
    samples: list[dict] = []

    def done() -> bool:
        samples.append(worker.pipeline.status())
        return fully_committed(worker.pipeline, 300)

    try:
        wait_for(done, timeout_s=120, what="all events committed", workers=[worker])
    finally:
        worker.stop()
    assert any(s["paused"] for s in samples), "partitions were paused at some point"
    assert samples[-1]["paused"] == 0, "and resumed once the work drained"
    # A poll may overshoot the bound by at most one poll's worth of records per partition.
    assert max(s["in_flight"] for s in samples) <= 16 + 8 * EVENT_PARTITIONS
    ids = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    assert set(ids) == stream.valid_ids and max(ids.values()) == 1


def test_a_dead_letter_log_line_names_the_event_id_and_the_source_coordinates(
    make_settings, engine_settings_overrides, guard_engine, caplog
):
    import logging

    import orjson

    settings = make_settings(**engine_settings_overrides)
    bad = {"event_id": "dl-log-1", "conversation_id": "c", "messages": [{"role": "wizard", "content": "hi"}]}
    produce(settings, [(b"c", orjson.dumps(bad))], partitions=1)
    worker = WorkerThread(settings, guard_engine).start()
    try:
        with caplog.at_level(logging.INFO, logger="worker.stream.pipeline"):
            wait_for(
                lambda: fully_committed(worker.pipeline, 1),
                timeout_s=STREAM_TIMEOUT_S,
                what="the record dead-lettered",
                workers=[worker],
            )
    finally:
        worker.stop()
    (line,) = [r for r in caplog.records if getattr(r, "stage", None) == "dead_letter"]
    assert line.event_id == "dl-log-1" and line.reason == "unknown_role"
    assert (line.topic, line.partition, line.offset) == (settings.topics.events, 0, 0)
