"""Crashes, cache and broker outages, shutdown under load: the worker as a real subprocess on the embedded
broker and Redis, with the trained tiny checkpoint. In every scenario: events lost = 0.

Stream sizes are knobs (MW_RELIABILITY_EVENTS, MW_STALL_SECONDS) so a laptop can run the full sizes of the
issue; the defaults are the CI values. MW_PUBLISHED_MARKERS=0 runs the crash test without published markers,
to compare the duplicates figure with and without them.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.support.accounting import (
    WorkerProcess,
    account,
    env_int,
    report,
    wait_until_answered,
    write_config,
)
from tests.support.kafka_io import build_stream, committed_offsets, produce
from worker.stream.kafka_clients import ensure_topics

pytestmark = pytest.mark.integration

CRASH_EVENTS = env_int("MW_RELIABILITY_EVENTS", 5000)
STALL_SECONDS = env_int("MW_STALL_SECONDS", 20)
PUBLISHED_MARKERS = bool(env_int("MW_PUBLISHED_MARKERS", 1))


def _setup(make_settings, tiny_model_dir, tmp_path, n: int, seed: int, **overrides):
    settings = make_settings(
        model__path=str(tiny_model_dir),
        model__device="cpu",
        ops__port=0,
        shutdown__drain_timeout_s=20,
        **overrides,
    )
    stream = build_stream(n, seed=seed, repeat_ratio=0.2, image_ratio=0.05, malformed_ratio=0.02)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    produce(settings, stream.records)
    config = write_config(settings, tmp_path / "worker.yaml")
    return settings, config


def _wait_for_progress(settings, at_least: int, worker: WorkerProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = account(settings)
        answered = snapshot.inputs - len(snapshot.lost)
        if answered >= at_least:
            return answered
        assert worker.alive, f"worker died on its own:\n{worker.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"no progress to {at_least} answered within {timeout_s}s:\n{worker.log_tail()}")


def test_sigkill_three_times_mid_stream_loses_nothing(
    services, make_settings, tiny_model_dir, tmp_path, reliability_figures
):
    settings, config = _setup(
        make_settings,
        tiny_model_dir,
        tmp_path,
        CRASH_EVENTS,
        seed=31,
        redis__published_markers=PUBLISHED_MARKERS,
    )
    rng = random.Random(2026)
    # Kill points: after random amounts of progress, spread over the stream.
    kill_after = sorted(rng.uniform(0.1, 0.75) * CRASH_EVENTS for _ in range(3))
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    crashes = 0
    try:
        for target in kill_after:
            _wait_for_progress(settings, int(target), worker, timeout_s=600)
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment inside whatever batch is in flight
            worker.kill()
            crashes += 1
            worker = WorkerProcess(config, tmp_path / "worker.log").start()
        result = wait_until_answered(settings, CRASH_EVENTS, timeout_s=900)
        code, _ = worker.terminate(timeout_s=60)
    finally:
        worker.close()
    assert result.lost == [], f"lost {len(result.lost)} events, e.g. {result.lost[:5]}\n{worker.log_tail()}"
    assert code == 0, worker.log_tail()
    markers = "with" if PUBLISHED_MARKERS else "WITHOUT"
    report(
        reliability_figures,
        f"SIGKILL x{crashes} during the stream ({markers} published markers): {result.line()} "
        f"({100 * result.duplicates / result.inputs:.2f}% of records answered twice)",
    )


def test_redis_killed_and_restarted_mid_stream(
    services, make_settings, tiny_model_dir, tmp_path, reliability_figures
):
    n = max(400, CRASH_EVENTS // 5)
    settings, config = _setup(
        make_settings, tiny_model_dir, tmp_path, n, seed=32, redis__reconnect_interval_s=0.5
    )
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        _wait_for_progress(settings, n // 5, worker, timeout_s=600)
        services.stop_redis()
        _wait_for_progress(settings, n // 2, worker, timeout_s=600)
        services.start_redis()
        result = wait_until_answered(settings, n, timeout_s=600)
        code, _ = worker.terminate(timeout_s=60)
    finally:
        if services.redis_pid is None:
            services.start_redis()
        worker.close()
    assert result.lost == [], worker.log_tail()
    assert code == 0, worker.log_tail()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "Traceback" not in log, worker.log_tail(80)
    report(reliability_figures, f"Redis killed and restarted mid-stream: {result.line()}")


def test_broker_stall_is_ridden_out(services, make_settings, tiny_model_dir, tmp_path, reliability_figures):
    n = max(400, CRASH_EVENTS // 5)
    settings, config = _setup(make_settings, tiny_model_dir, tmp_path, n, seed=33)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        _wait_for_progress(settings, n // 4, worker, timeout_s=600)
        services.pause_broker()
        try:
            time.sleep(STALL_SECONDS)
            assert worker.alive, worker.log_tail()
        finally:
            services.resume_broker()
        result = wait_until_answered(settings, n, timeout_s=600)
        code, _ = worker.terminate(timeout_s=60)
    finally:
        worker.close()
    assert result.lost == [], worker.log_tail()
    assert code == 0, worker.log_tail()
    report(reliability_figures, f"broker paused (SIGSTOP) {STALL_SECONDS}s mid-stream: {result.line()}")


def test_sigterm_under_load_drains_commits_and_exits_zero(
    services, make_settings, tiny_model_dir, tmp_path, reliability_figures
):
    n = max(1000, CRASH_EVENTS // 2)
    settings = make_settings(
        model__path=str(tiny_model_dir), model__device="cpu", ops__port=0, shutdown__drain_timeout_s=20
    )
    stream = build_stream(n, seed=34, repeat_ratio=0.2, image_ratio=0.05, malformed_ratio=0.02)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    ensure_topics(settings, [settings.topics.events], partitions=4)
    config = write_config(settings, tmp_path / "worker.yaml")
    # Events keep arriving while the signal lands: a producer trickles the stream in the background.
    first, rest = stream.records[: n // 5], stream.records[n // 5 :]
    produce(settings, first)
    stop_producing = threading.Event()

    def trickle() -> None:
        for i in range(0, len(rest), 25):
            if stop_producing.is_set():
                return
            produce(settings, rest[i : i + 25])
            time.sleep(0.05)

    producer = threading.Thread(target=trickle, daemon=True)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        _wait_for_progress(settings, n // 10, worker, timeout_s=600)
        producer.start()
        time.sleep(1.0)
        still_flowing = producer.is_alive()
        code, seconds = worker.terminate(timeout_s=settings.shutdown.drain_timeout_s + 30)
    finally:
        worker.close()
    producer.join(timeout=120)
    assert still_flowing, "the stream had ended before SIGTERM; the test would not test shutdown under load"
    assert code == 0, worker.log_tail()
    assert seconds <= settings.shutdown.drain_timeout_s + 10, seconds
    # Nothing is committed without its answer: every offset below each committed offset has one.
    committed = committed_offsets(settings, settings.topics.events)
    lost = set(account(settings).lost)
    for partition, offset in committed.items():
        assert offset is not None
        assert not [o for (p, o) in lost if p == partition and o < offset], (partition, offset)
    done_at_stop = sum(v or 0 for v in committed.values())
    # A second worker takes over from the committed offsets and finishes the stream: still nothing lost.
    successor = WorkerProcess(config, tmp_path / "worker2.log").start()
    try:
        result = wait_until_answered(settings, n, timeout_s=600)
        successor.terminate(timeout_s=60)
    finally:
        successor.close()
    assert result.lost == [], successor.log_tail()
    report(
        reliability_figures,
        f"SIGTERM while events flow: exit 0 after {seconds:.1f}s drain (deadline "
        f"{settings.shutdown.drain_timeout_s:.0f}s), {done_at_stop}/{n} offsets committed at stop, none "
        f"without an answer; a successor finished the stream: {result.line()}",
    )
