"""Intake processes: real child processes, real Redis, the tiny checkpoint, the embedded broker.

What is proven: a process publishes exactly the records the loop thread would answer from the cache, the
same output records, and marks them; everything else comes back unanswered; a process that dies or hangs
loses nothing (its chunk is redone on the loop thread) and is started again; no process outlives its
pipeline; a revoke completes the chunks out before it commits, so a graceful hand-over duplicates nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import orjson
import pytest
from kafka.structs import TopicPartition

from tests.support import kafka_io
from worker.cache.published import PublishedMarkers, record_digest
from worker.cache.redis_cache import VerdictCache
from worker.contracts.dead_letters import SourceCoordinates
from worker.contracts.decode import decode_event
from worker.engine.registry import ModelRegistry
from worker.moderation.moderator import Moderator, Routed
from worker.ops import metrics
from worker.stream import intake, intake_pool
from worker.stream.intake_pool import IntakePool, IntakeProcessError
from worker.stream.kafka_clients import ensure_topics
from worker.stream.publisher import output_topics
from worker.stream.records import Encoder, verdict_facts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

VARYING = ("latency_ms", "decided_at")  # the only verdict fields that depend on when it was built


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


def ready_pool(settings, registry, processes: int = 1) -> IntakePool:
    pool = IntakePool(settings, registry, processes)
    deadline = time.monotonic() + 60
    while not pool.wants(intake_pool.START_BURST):
        assert time.monotonic() < deadline, "intake processes did not start within 60 s"
        time.sleep(0.05)
    return pool


def comparable(value: bytes) -> dict:
    verdict = orjson.loads(value)
    for name in VARYING:
        verdict.pop(name)
    return verdict


def text_events(n: int, prefix: str) -> list[dict]:
    stream = kafka_io.build_stream(
        n, seed=5, repeat_ratio=0, image_ratio=0, malformed_ratio=0, id_prefix=prefix
    )
    return [orjson.loads(value) for _, value in stream.records]


def test_a_process_publishes_exactly_the_cache_hits_as_the_loop_thread_would_and_marks_them(
    make_settings, engine_settings_overrides, guard_engine
):
    settings = make_settings(**engine_settings_overrides)
    ensure_topics(settings, output_topics(settings.topics))
    registry = ModelRegistry.of(guard_engine, settings)
    moderator = Moderator(registry, settings)
    cache = VerdictCache(settings.redis)
    events = text_events(12, "hit")
    cached, missed = events[:8], events[8:]
    keyed = [moderator.key(moderator.route(decode_event(orjson.dumps(e), settings))) for e in cached]
    results = guard_engine.classify([moderator.ready(k).request for k in keyed])
    moderator.store(cache, list(zip(keyed, results, strict=True)))
    image = kafka_io.build_stream(40, seed=3, image_ratio=1, repeat_ratio=0, malformed_ratio=0)
    image_value = next(v for _, v in image.records if b"image_url" in v)
    values = [orjson.dumps(e) for e in cached + missed] + [b"{not json", image_value]
    sent_ms = int(time.time() * 1000)
    items = [(v, time.monotonic(), "chat.events", 1, offset, sent_ms) for offset, v in enumerate(values)]

    pool = ready_pool(settings, registry)
    try:
        (pid,) = pool.pids
        answers = pool.submit(items).result(timeout=60)
    finally:
        pool.close()
    assert not alive(pid), "the intake process outlived its pool"

    assert answers.published == list(range(8))  # the cache hits; the rest is the loop thread's
    assert (answers.cache_hits, answers.cache_misses, answers.failed_deliveries) == (8, 0, 0)
    assert len(answers.end_to_end_s) == 8 and all(0 <= s < 60 for s in answers.end_to_end_s)
    encoder = Encoder(settings.topics)
    expected = {}
    tally: Counter[tuple] = Counter()
    for offset, item in enumerate(keyed):
        assert isinstance(item.routed, Routed)
        hit = moderator.answers(cache, [item])[0]
        verdict = moderator.verdict(
            item, hit, latency_ms=0.0, source=SourceCoordinates("chat.events", 1, offset)
        )
        expected[verdict["event_id"]] = encoder.verdict(verdict)
        facts = verdict_facts(verdict, item.routed.model)
        tally[(facts.decision, facts.codes, facts.cached, facts.model)] += 1
    assert answers.tally == dict(tally) and all(cached for _, _, cached, _ in tally)
    published = {}
    for topic in output_topics(settings.topics):
        for record in kafka_io.read_all(settings, topic):
            event_id = dict(record.headers)["event_id"].decode()
            published.setdefault(event_id, []).append((topic, record))
    assert set(published) == set(expected), "exactly the cache hits are published"
    for event_id, records in published.items():
        output = expected[event_id]
        assert tuple(topic for topic, _ in records) == output.topics
        for _, record in records:
            assert comparable(record.value) == comparable(output.value)
            assert (record.key, list(record.headers)) == (output.key, output.headers)
    markers = PublishedMarkers(cache, settings)
    tp = TopicPartition("chat.events", 1)
    markers.raise_high([(tp, 7)])  # what the worker does when it reads the answer
    markers.settle()
    markers.forget(tp)  # read the high-water mark back from Redis
    coordinates = [(tp, offset, record_digest(value)) for value, _, _, _, offset, _ in items]
    assert markers.acknowledged(coordinates) == [True] * 8 + [False] * 6
    markers.close()
    cache.close()


def test_a_killed_process_fails_its_chunk_and_the_pool_starts_again(
    make_settings, engine_settings_overrides, guard_engine
):
    settings = make_settings(**engine_settings_overrides)
    registry = ModelRegistry.of(guard_engine, settings)
    pool = ready_pool(settings, registry)
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)
        future = pool.submit([(b"{}", time.monotonic(), "t", 0, 0, 0)])
        with pytest.raises(IntakeProcessError):
            future.result(timeout=30)
        pool.failed(future.exception())
        assert pool.pids == [] and pool.ready_processes == 0
        deadline = time.monotonic() + 60
        while not pool.wants(intake_pool.START_BURST):  # the next burst starts a new one
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (new_pid,) = pool.pids
        assert new_pid != pid
        assert pool.submit([(b"{}", time.monotonic(), "t", 0, 0, 0)]).result(timeout=30).published == []
    finally:
        pool.close()


def warm_then_stream(settings, engine, monkeypatch, disturb) -> tuple[kafka_io.WorkerThread, list[dict]]:
    """Cache 30 conversations, start a worker whose intake process starts at once, disturb the process, then
    stream 600 repeats of them (new event ids) plus malformed records; return the worker and the events."""
    monkeypatch.setattr(intake_pool, "START_BURST", 1)
    originals = text_events(30, "orig")
    kafka_io.produce(settings, [(None, orjson.dumps(e)) for e in originals])
    worker = kafka_io.WorkerThread(settings, engine, name="pooled").start()
    kafka_io.wait_for(
        lambda: (
            kafka_io.fully_committed(worker.pipeline, len(originals))
            and worker.pipeline.status().intake_processes == 1
        ),
        timeout_s=120,
        what="originals answered and the intake process ready",
        workers=[worker],
    )
    disturb(worker.pipeline._intake_pool.pids[0])
    repeats = [dict(originals[i % len(originals)], event_id=f"rep-{i}") for i in range(600)]
    records = [(None, orjson.dumps(e)) for e in repeats] + [(None, value) for value, _ in kafka_io.MALFORMED]
    kafka_io.produce(settings, records)
    return worker, originals + repeats


@contextlib.contextmanager
def stopping_the_process() -> Iterator[Callable[[int], None]]:
    """A ``disturb`` for ``warm_then_stream`` that SIGSTOPs the intake process; continued when the block ends."""
    stopped: list[int] = []

    def stop(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    try:
        yield stop
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def assert_every_event_answered_once(settings, worker, events) -> None:
    total = len(events) + len(kafka_io.MALFORMED)
    kafka_io.wait_for(
        lambda: kafka_io.fully_committed(worker.pipeline, total),
        timeout_s=180,
        what="all committed",
        workers=[worker],
    )
    pids = list(worker.pipeline._intake_pool.pids)
    worker.stop()
    ids = Counter(v["event_id"] for v in kafka_io.read_json(settings, settings.topics.verdicts))
    assert set(ids) == {e["event_id"] for e in events} and max(ids.values()) == 1
    dead = kafka_io.read_json(settings, settings.topics.dlq)
    assert sorted(d["reason"] for d in dead) == sorted(reason for _, reason in kafka_io.MALFORMED)
    assert not any(alive(pid) for pid in pids), "an intake process outlived its pipeline"


def test_while_every_process_is_busy_the_loop_thread_takes_the_next_poll(
    make_settings, engine_settings_overrides, guard_engine
):
    """Work sharing: a process gets a second chunk while it works on one, then polls stay on the loop thread;
    and chunks are never queued past the in-flight bound (that paused the partitions)."""
    settings = make_settings(**engine_settings_overrides, **{"batching.max_in_flight": 300})
    pool = ready_pool(settings, ModelRegistry.of(guard_engine, settings))
    item = (b"{}", time.monotonic(), "t", 0, 0, 0)
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # the process holds its chunks until it is continued
        futures = [pool.submit([item])]
        assert pool.wants(1) is True and not pool.busy  # one waiting beside the one it works on
        futures.append(pool.submit([item]))
        assert intake_pool.BUSY_CHUNKS == 2 and pool.wants(1) is False  # busy: the loop thread's turn
        assert pool.busy
        os.kill(pid, signal.SIGCONT)
        assert [f.result(timeout=30).published for f in futures] == [[], []]
        deadline = time.monotonic() + 10
        while not pool.wants(1):  # the courier counts the answer just after it lands
            assert time.monotonic() < deadline, "the process stayed busy after answering"
            time.sleep(0.01)
        assert not pool.busy
        os.kill(pid, signal.SIGSTOP)
        futures = [pool.submit([item] * 200)]
        assert pool.wants(100) is True and pool.wants(101) is False  # 200 out + 101 > 300 in flight
        os.kill(pid, signal.SIGCONT)
        assert futures[0].result(timeout=30).published == []
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.close()


def test_a_stream_of_repeats_is_answered_by_the_intake_process_once_each(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    settings = make_settings(**engine_settings_overrides)
    answered_before = metrics.INTAKE_PROCESS_ANSWERS._value.get()
    worker, events = warm_then_stream(settings, guard_engine, monkeypatch, lambda pid: None)
    assert_every_event_answered_once(settings, worker, events)
    assert metrics.INTAKE_PROCESS_ANSWERS._value.get() - answered_before >= 300  # most repeats went there


def test_while_the_process_is_busy_the_loop_thread_answers_polls_of_hits_as_it_would(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    """The process is stopped with two chunks out: the next polls of cache hits are answered on the loop thread
    by the same code (published, acknowledged, marked — its markers on the markers' thread), polled in smaller
    bites (the loop thread comes back sooner to feed the process), and nothing is answered twice once the
    process resumes."""
    settings = make_settings(**engine_settings_overrides, kafka__max_poll_records=40)
    sizes: list[int] = []
    answer_here = intake.publish_chunk

    def recorded(items, context=None):
        sizes.append(len(items))
        return answer_here(items, context)

    monkeypatch.setattr(intake, "publish_chunk", recorded)
    made_on: list[str] = []
    make_producer = intake.answer_producer

    def made(settings):
        made_on.append(threading.current_thread().name)
        return make_producer(settings)

    monkeypatch.setattr(intake, "answer_producer", made)
    with stopping_the_process() as stop:
        worker, events = warm_then_stream(settings, guard_engine, monkeypatch, stop)
        kafka_io.wait_for(
            lambda: worker.pipeline.counters["intake_loop_answers"] >= 200,
            timeout_s=120,
            what="polls answered on the loop thread while the process is stopped",
            workers=[worker],
        )
        assert worker.pipeline.counters["intake_process_answers"] == 0, "the stopped process answered nothing"
        assert sizes and max(sizes) <= 40, "polls answered here, whole"
        # Made once, in the background as the processes started: not on the loop thread, when it first needs it.
        assert made_on == ["intake-answer-producer"]
    assert_every_event_answered_once(settings, worker, events)
    assert worker.pipeline.counters["intake_process_answers"] > 0, "its two chunks, once it resumed"
    cache = VerdictCache(settings.redis)
    markers = PublishedMarkers(cache, settings)
    consumed = kafka_io.read_all(settings, settings.topics.events)
    coordinates = [(TopicPartition(r.topic, r.partition), r.offset, record_digest(r.value)) for r in consumed]
    assert len(coordinates) == len(events) + len(kafka_io.MALFORMED)
    assert all(markers.acknowledged(coordinates)), "every answered record is marked, the loop thread's too"
    markers.close()
    cache.close()


def test_when_answering_on_the_loop_thread_fails_the_staged_path_answers_everything(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    settings = make_settings(**engine_settings_overrides, kafka__max_poll_records=40)
    calls: list[int] = []

    def broken(items, context):
        calls.append(len(items))
        raise RuntimeError("a bug in the loop thread's answer path")

    monkeypatch.setattr(intake, "publish_chunk", broken)
    with stopping_the_process() as stop:
        worker, events = warm_then_stream(settings, guard_engine, monkeypatch, stop)
        kafka_io.wait_for(
            lambda: worker.pipeline.counters["completed"] >= 500,
            timeout_s=120,
            what="repeats answered while the process is stopped",
            workers=[worker],
        )
    assert_every_event_answered_once(settings, worker, events)
    assert len(calls) == 1, "tried once, then the staged path for good"
    assert worker.pipeline.counters["intake_loop_answers"] == 0


def test_chunks_sent_back_to_back_are_answered_in_order_each_with_its_own_records(
    make_settings, engine_settings_overrides, guard_engine
):
    """A process publishes a waiting chunk before it waits for the acks of the one before: each answer still
    names its own chunk's records."""
    settings = make_settings(**engine_settings_overrides)
    ensure_topics(settings, output_topics(settings.topics))
    registry = ModelRegistry.of(guard_engine, settings)
    moderator = Moderator(registry, settings)
    cache = VerdictCache(settings.redis)
    events = text_events(10, "order")
    keyed = [moderator.key(moderator.route(decode_event(orjson.dumps(e), settings))) for e in events[:6]]
    results = guard_engine.classify([moderator.ready(k).request for k in keyed])
    moderator.store(cache, list(zip(keyed, results, strict=True)))
    cache.close()
    hits, misses = [orjson.dumps(e) for e in events[:6]], [orjson.dumps(e) for e in events[6:]]

    def chunk(values: list[bytes], first: int) -> list:
        return [(v, time.monotonic(), "chat.events", 0, first + i, 0) for i, v in enumerate(values)]

    chunks = [
        chunk([hits[0], hits[1], misses[0], hits[2]], 0),
        chunk([misses[1], hits[3]], 4),
        chunk([b"{not json", misses[2], hits[4], hits[5]], 6),
    ]
    pool = ready_pool(settings, registry)
    try:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # all three wait in the pipe: the process finds the next one waiting
        futures = [pool.submit(c) for c in chunks]
        os.kill(pid, signal.SIGCONT)
        answers = [f.result(timeout=60) for f in futures]
    finally:
        os.kill(pid, signal.SIGCONT)
        pool.close()
    assert [a.published for a in answers] == [[0, 1, 3], [1], [2, 3]]
    assert [a.cache_hits for a in answers] == [3, 1, 2]
    published = Counter(
        dict(r.headers)["event_id"].decode() for r in kafka_io.read_all(settings, settings.topics.verdicts)
    )
    assert published == Counter(e["event_id"] for e in events[:6]), "each hit once"


def test_a_process_killed_mid_stream_loses_nothing(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    settings = make_settings(**engine_settings_overrides)
    worker, events = warm_then_stream(
        settings, guard_engine, monkeypatch, lambda pid: os.kill(pid, signal.SIGKILL)
    )
    assert_every_event_answered_once(settings, worker, events)


def test_a_hung_process_is_given_up_on_and_its_chunks_are_redone(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    monkeypatch.setattr(intake, "CHUNK_TIMEOUT_S", 1.0)
    settings = make_settings(**engine_settings_overrides)
    stopped: list[int] = []

    def hang(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    try:
        worker, events = warm_then_stream(settings, guard_engine, monkeypatch, hang)
        assert_every_event_answered_once(settings, worker, events)
        assert not alive(stopped[0]), "the hung process was not stopped"
    finally:
        for pid in stopped:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_revoke_completes_the_chunk_out_in_a_process_before_it_commits(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    """A process publishes on its own: a chunk still out when the partitions move must be completed (and
    committed) by this worker, or their next owner publishes those events a second time."""
    settings = make_settings(**engine_settings_overrides)
    held: list[int] = []

    def hold(pid: int) -> None:  # the next chunk waits in the process until the revoke settles it
        os.kill(pid, signal.SIGSTOP)
        held.append(pid)

    worker, events = warm_then_stream(settings, guard_engine, monkeypatch, hold)
    pipeline = worker.pipeline
    settled: list[bool] = []
    real_settle = pipeline.intake.settle

    def settle(timeout_s: float) -> None:
        # The process goes on 3 s into the revoke: without the wait, the group has moved on by then.
        if pipeline.intake.pending and held:
            settled.append(True)
            threading.Timer(3.0, os.kill, (held[0], signal.SIGCONT)).start()
        real_settle(timeout_s)

    monkeypatch.setattr(pipeline.intake, "settle", settle)
    other = None
    try:
        kafka_io.wait_for(lambda: pipeline.intake.pending, timeout_s=60, what="a chunk out", workers=[worker])
        other = kafka_io.WorkerThread(settings, guard_engine, name="joining").start()
        kafka_io.wait_for(
            lambda: bool(settled), timeout_s=120, what="a revoke with a chunk out", workers=[worker]
        )
        total = len(events) + len(kafka_io.MALFORMED)
        kafka_io.wait_for(
            lambda: (
                pipeline.status().counters["completed"] + other.pipeline.status().counters["completed"]
                >= total
                and pipeline.status().all_committed
                and other.pipeline.status().all_committed
            ),
            timeout_s=180,
            what="all answered and committed by the two workers",
            workers=[worker, other],
        )
    finally:
        for pid in held:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
        if other is not None:
            other.stop()
        worker.stop()
    ids = Counter(v["event_id"] for v in kafka_io.read_json(settings, settings.topics.verdicts))
    assert set(ids) == {e["event_id"] for e in events}
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]
