"""Rebalances with work in flight: two pipelines in one consumer group on the embedded broker.

Pipeline A runs in this process (so its state at the rebalance can be recorded); its engine is the real
tiny-checkpoint engine behind a slow device (every forward pass takes ``SLOW_PASS_S`` longer) and its
in-flight bound is small, so it is paused for backpressure with work in flight on the partitions it holds
whenever a rebalance lands. Pipeline B is a real ``moderation-worker run`` subprocess that joins, or leaves
(SIGKILL: no drain, no commit; or SIGTERM: drain and leave the group). Each scenario ends with every input
offset answered (verdict or dead letter), the group's committed offset at the end offset of every
partition, and A's partitions not paused. Duplicates are counted, not forbidden (at-least-once).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from kafka.structs import TopicPartition

from tests.reliability.accounting import WorkerProcess, env_int, report, wait_until_answered, write_config
from tests.stream.streaming import WorkerThread, build_stream, committed_offsets, end_offsets, wait_for
from worker.stream.kafka_clients import ensure_topics, make_producer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PARTITIONS = 4
EVENTS = env_int("MW_REBALANCE_EVENTS", 800)
SLOW_PASS_S = 0.6
A_SETTINGS = {
    "batching__max_in_flight": 24,
    "batching__max_size": 4,
    "batching__max_wait_ms": 50,
    # Small fetches and polls: A's in-flight work spreads over every partition it holds.
    "kafka__max_poll_records": 8,
    "kafka__max_partition_fetch_bytes": 4096,
}


class SlowDevice:
    """The real engine, each forward pass ``SLOW_PASS_S`` slower (a busy GPU): keeps A's work in flight."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def run(self, prepared: Any) -> Any:
        time.sleep(SLOW_PASS_S)
        return self._engine.run(prepared)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class RebalanceProbe:
    """Records, at each rebalance callback of A, what A held in flight and what the client had paused."""

    def __init__(self, worker: WorkerThread) -> None:
        self.pipeline = worker.pipeline
        self.revocations: list[dict[str, Any]] = []
        original = self.pipeline._on_revoked

        def on_revoked(revoked: set[TopicPartition]) -> None:
            consumer = self.pipeline._consumer
            if not revoked:  # the first join revokes nothing
                original(revoked)
                return
            self.revocations.append(
                {
                    "at": time.monotonic(),
                    "in_flight": {tp.partition: self.pipeline._tracker.in_flight(tp) for tp in revoked},
                    "paused": {tp.partition for tp in consumer.paused()} if consumer is not None else set(),
                }
            )
            original(revoked)

        original_assigned = self.pipeline._on_assigned

        def on_assigned(assigned: set[TopicPartition]) -> None:
            if self.revocations and "kept_with_work" not in self.revocations[-1]:
                last = self.revocations[-1]
                last["kept_with_work"] = sorted(
                    tp.partition for tp in assigned if last["in_flight"].get(tp.partition)
                )
            original_assigned(assigned)

        self.pipeline._on_revoked = on_revoked  # type: ignore[method-assign]
        self.pipeline._on_assigned = on_assigned  # type: ignore[method-assign]

    def state(self) -> dict[str, Any]:
        """A's client assignment, what A paused, and its in-flight offsets per partition (read from its loop)."""
        p = self.pipeline
        assignment = p._consumer.assignment() if p._consumer is not None else set()
        return {
            "assigned": sorted(tp.partition for tp in assignment),
            "paused": sorted(tp.partition for tp in p._paused),
            "in_flight": {tp.partition: p._tracker.in_flight(tp) for tp in assignment},
            "consumed": p.counters["consumed"],
            "completed": p.counters["completed"],
        }

    def wait_held_everywhere(self, timeout_s: float) -> None:
        """Wait until A is paused with offsets in flight on all but at most one partition it holds.

        (All of them at once is rare: fetches drain partition by partition.) Whichever half A keeps when
        a second worker joins, at least one kept partition then has work in flight; when B leaves, A
        keeps both of its partitions.
        """
        deadline = time.monotonic() + timeout_s
        seen: Counter[tuple[int, int, int]] = Counter()  # (partitions held, paused, holding work)
        while time.monotonic() < deadline:
            state = self.state()
            holding = sum(1 for n in state["in_flight"].values() if n)
            if state["assigned"] and state["paused"] == state["assigned"] and holding >= len(state["assigned"]) - 1:
                return
            seen[(len(state["assigned"]), len(state["paused"]), sum(1 for n in state["in_flight"].values() if n))] += 1
            time.sleep(0.05)
        raise AssertionError(
            f"A never held work on every partition while paused; (held, paused, with work) seen: {seen}; "
            f"last: {state}"
        )


def produce_interleaved(settings: Any, records: list[tuple[bytes | None, bytes]]) -> None:
    """Round-robin over the partitions, one record per partition per producer batch (so fetches stay small
    and A's work spreads over every partition it holds)."""
    producer = make_producer(settings, linger_ms=0)
    try:
        for i, (key, value) in enumerate(records):
            producer.send(settings.topics.events, key=key, value=value, partition=i % PARTITIONS)
            if i % PARTITIONS == PARTITIONS - 1:
                producer.flush(timeout=30)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def _setup(
    make_settings: Any, tiny_model_dir: Any, tmp_path: Any, seed: int, first: float
) -> tuple[Any, Any, Any, list[tuple[bytes | None, bytes]]]:
    """Settings of the group (B) and of A, B's config file; produces ``first`` of the stream, returns the rest."""
    settings = make_settings(
        model__path=str(tiny_model_dir), model__device="cpu", ops__port=0, shutdown__drain_timeout_s=20
    )
    stream = build_stream(EVENTS, seed=seed, repeat_ratio=0.1, image_ratio=0.0, malformed_ratio=0.02)
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    config = write_config(settings, tmp_path / "worker-b.yaml")
    a_settings = make_settings(
        model__path=str(tiny_model_dir), model__device="cpu", ops__port=0, shutdown__drain_timeout_s=20,
        **A_SETTINGS,
    )
    cut = int(len(stream.records) * first)
    produce_interleaved(settings, stream.records[:cut])
    return settings, a_settings, config, stream.records[cut:]


def _assert_all_answered_and_committed(settings: Any, a: WorkerThread, what: str) -> Any:
    result = wait_until_answered(settings, EVENTS, timeout_s=600)
    assert result.lost == [], f"{what}: lost {len(result.lost)} offsets, e.g. {result.lost[:8]}"
    ends = end_offsets(settings, settings.topics.events)
    wait_for(
        lambda: committed_offsets(settings, settings.topics.events, PARTITIONS) == ends,
        timeout_s=120,
        what=f"committed offsets at the end offsets {ends}",
        workers=[a],
    )
    wait_for(lambda: not a.pipeline.status()["paused"], timeout_s=60, what="A resumed", workers=[a])
    return result


def test_a_second_worker_joins_while_the_first_holds_work_on_every_partition(
    make_settings, guard_engine, tiny_model_dir, tmp_path, reliability_figures
):
    settings, a_settings, config, _ = _setup(make_settings, tiny_model_dir, tmp_path, seed=71, first=1.0)
    a = WorkerThread(a_settings, SlowDevice(guard_engine), name="a")
    probe = RebalanceProbe(a)
    a.start()
    b = None
    try:
        wait_for(lambda: len(a.pipeline.status()["assigned"]) == PARTITIONS, timeout_s=60, what="A owns all",
                 workers=[a])
        probe.wait_held_everywhere(120)
        b = WorkerProcess(config, tmp_path / "worker-b.log").start()
        wait_for(lambda: len(a.pipeline.status()["assigned"]) < PARTITIONS, timeout_s=180,
                 what="B joined and took partitions", workers=[a])
        result = _assert_all_answered_and_committed(settings, a, "join")
        b_code, _ = b.terminate(timeout_s=60)
    finally:
        if b is not None:
            b.close()
        a.stop()
    assert probe.revocations, "A saw no rebalance"
    first = probe.revocations[0]
    assert first["kept_with_work"], first  # A kept a partition with work in flight
    assert b_code == 0, b.log_tail() if b is not None else ""
    report(reliability_figures, f"rebalance: a worker joins while the other is paused with work on every "
                                f"partition: {result.line()}; at the revocation A held {sum(first['in_flight'].values())} offsets in flight on "
                                f"{sum(1 for n in first['in_flight'].values() if n)} partitions, "
                                f"{len(first['paused'])} paused")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_worker_leaves_while_the_other_holds_work_in_flight(
    how, make_settings, guard_engine, tiny_model_dir, tmp_path, reliability_figures
):
    settings, a_settings, config, rest = _setup(
        make_settings, tiny_model_dir, tmp_path, seed=72 if how == "SIGKILL" else 73, first=0.7
    )
    a = WorkerThread(a_settings, SlowDevice(guard_engine), name="a")
    probe = RebalanceProbe(a)
    a.start()
    b = WorkerProcess(config, tmp_path / "worker-b.log").start()
    try:
        wait_for(lambda: len(a.pipeline.status()["assigned"]) == PARTITIONS // 2, timeout_s=180,
                 what="A and B split the partitions", workers=[a])
        joined_revocations = len(probe.revocations)
        probe.wait_held_everywhere(120)
        produce_interleaved(settings, rest)  # B has fresh work in flight when it leaves
        if how == "SIGKILL":
            b.kill()
        else:
            code, _ = b.terminate(timeout_s=60)
            assert code == 0, b.log_tail()
        wait_for(lambda: len(a.pipeline.status()["assigned"]) == PARTITIONS, timeout_s=120,
                 what="A took over B's partitions", workers=[a])
        result = _assert_all_answered_and_committed(settings, a, f"leave ({how})")
    finally:
        b.close()
        a.stop()
    at_leave = probe.revocations[joined_revocations:]
    assert at_leave, "A saw no rebalance when B left"
    assert at_leave[0]["kept_with_work"], at_leave[0]
    report(reliability_figures, f"rebalance: a worker leaves ({how}) while the other is paused with work in "
                                f"flight: {result.line()}; at the revocation A held "
                                f"{sum(at_leave[0]['in_flight'].values())} offsets in flight, {len(at_leave[0]['paused'])} "
                                f"partitions paused")
