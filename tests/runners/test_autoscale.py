"""Autoscaling GuardWorker actors on Kafka lag: the plan (pure) and the fleet on real Ray, broker and tiny model."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.stream.streaming import build_stream, produce, read_json
from worker.runners.ray_fleet import LagScaler, WorkerFleet
from worker.stream.kafka_clients import ensure_topics

PARTITIONS = 2


def scaler(**overrides: Any) -> LagScaler:
    return LagScaler(
        **{"min_workers": 1, "max_workers": 4, "lag_per_worker": 100, "scale_in_after_s": 30.0, **overrides}
    )


@pytest.mark.parametrize(
    ("current", "lag", "partitions", "planned"),
    [
        (1, 0, 8, 1),  # idle: min_workers
        (1, 250, 8, 3),  # out at once to ceil(lag / lag_per_worker)
        (1, 10_000, 8, 4),  # never beyond max_workers
        (1, 10_000, 2, 2),  # never beyond the topic's partitions
        (4, 10_000, 2, 2),  # partitions fewer than actors: the idle ones go at once
        (2, 150, 8, 2),  # steady
        (1, 10_000, 0, 4),  # partitions unknown yet: max_workers bounds
    ],
)
def test_the_plan_follows_lag_within_bounds(current: int, lag: int, partitions: int, planned: int) -> None:
    assert scaler().plan(current, lag, partitions, now=0.0) == planned


def test_scale_in_waits_for_a_quiet_period_and_steps_one_actor_at_a_time() -> None:
    plan = scaler(scale_in_after_s=30.0)
    assert plan.plan(4, 0, 8, now=0.0) == 4  # low lag starts the quiet period
    assert plan.plan(4, 0, 8, now=29.0) == 4
    assert plan.plan(4, 0, 8, now=30.0) == 3  # one step in
    assert plan.plan(3, 0, 8, now=31.0) == 3  # the next needs another quiet period
    assert plan.plan(3, 500, 8, now=40.0) == 4  # a burst resets it and scales out at once
    assert plan.plan(4, 0, 8, now=41.0) == 4
    assert plan.plan(4, 0, 8, now=71.0) == 3


def test_min_workers_is_kept_even_at_zero_lag() -> None:
    plan = scaler(min_workers=2, scale_in_after_s=0.0)
    assert plan.plan(2, 0, 8, now=0.0) == 2
    assert plan.plan(1, 0, 8, now=1.0) == 2


def _step(fleet: WorkerFleet, history: list[tuple[int, int]]) -> None:
    fleet.poll(timeout_s=10.0)
    fleet.autoscale(partitions=PARTITIONS)
    history.append((len(fleet.slots), fleet.group_lag()))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_actors_scale_out_on_lag_capped_at_partitions_and_back_in_with_a_graceful_drain(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path
) -> None:
    settings = make_settings(
        model__path=str(tiny_model_dir),
        ops__port=0,
        shutdown__drain_timeout_s=20.0,
        batching__max_wait_ms=20,
        batching__max_size=8,
        ray__num_workers=1,
        ray__num_gpus_per_worker=1.0,
        ray__autoscale=True,
        ray__min_workers=1,
        ray__max_workers=3,  # more than the partitions: the cap must come from the topic
        ray__lag_per_worker=20,
        ray__scale_in_after_s=3.0,
    )
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    backlog = build_stream(
        300, seed=21, repeat_ratio=0.0, image_ratio=0.0, malformed_ratio=0.0, id_prefix="lag"
    )
    trickle = build_stream(
        80, seed=22, repeat_ratio=0.0, image_ratio=0.0, malformed_ratio=0.0, id_prefix="calm"
    )
    produce(settings, backlog.records, partitions=PARTITIONS)

    history: list[tuple[int, int]] = []
    fleet = WorkerFleet(settings)
    fleet.start()
    started = time.monotonic()
    try:
        assert len(fleet.slots) == 1
        deadline = time.monotonic() + 240
        while len(fleet.slots) == 1:
            assert time.monotonic() < deadline, history[-10:]
            _step(fleet, history)
            time.sleep(0.5)
        scaled_out_at = time.monotonic() - started
        assert len(fleet.slots) == PARTITIONS  # wanted 300 / 20 = 15 actors: capped at 2 partitions
        lag_at_scale_out = max(lag for _, lag in history)
        assert lag_at_scale_out > settings.ray.lag_per_worker

        deadline = time.monotonic() + 300
        while {v["event_id"] for v in read_json(settings, settings.topics.verdicts)} != backlog.valid_ids:
            assert time.monotonic() < deadline, history[-10:]
            _step(fleet, history)
            assert len(fleet.slots) <= PARTITIONS
            time.sleep(1.0)

        # Scale in while events keep arriving, too few to need two actors: the leaving actor drains.
        def produce_slowly() -> None:
            for record in trickle.records:
                produce(settings, [record], partitions=PARTITIONS)
                time.sleep(0.1)

        producer = threading.Thread(target=produce_slowly, daemon=True)
        producer.start()
        deadline = time.monotonic() + 180
        while len(fleet.slots) > 1:
            assert time.monotonic() < deadline, history[-10:]
            _step(fleet, history)
            time.sleep(0.5)
        producer.join(timeout=120)
        (final,) = fleet.drained
        assert final["drained"] is True and final["worker_index"] == 1
        deadline = time.monotonic() + 180
        while not trickle.valid_ids <= {v["event_id"] for v in read_json(settings, settings.topics.verdicts)}:
            assert time.monotonic() < deadline
            _step(fleet, history)
            time.sleep(1.0)
    finally:
        fleet.stop()
    verdicts = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    backlog_duplicates = sum(verdicts[e] - 1 for e in backlog.valid_ids)
    print(
        f"\nautoscale: out to {PARTITIONS} after {scaled_out_at:.1f}s at lag {lag_at_scale_out}; "
        f"{backlog_duplicates} duplicate verdicts across the scale-out rebalance; scale-in drained the "
        f"leaving actor with events flowing; actor counts seen {sorted({n for n, _ in history})}"
    )
    assert max(n for n, _ in history) == PARTITIONS
    # Scale-in drains: every event that arrived around it has exactly one verdict.
    assert [e for e in trickle.valid_ids if verdicts[e] != 1] == []
