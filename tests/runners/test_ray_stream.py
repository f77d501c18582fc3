"""The stream on real Ray actors (session Ray instance with 2 fake GPUs), real broker, Redis and tiny model.

Events are mostly text-only with repeats (cache hits) so 1,000 of them stay cheap on 2 shared cores; each
test prints its wall time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import ray

from tests.support.kafka_io import build_stream, produce, read_json
from tests.support.ray_drain import run_until_drained
from worker.config import Settings
from worker.runners.ray_actor import WorkerStatus
from worker.runners.ray_fleet import WorkerFleet
from worker.stream.kafka_clients import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4


def stream_settings(make_settings: Any, tiny_model_dir: Path, **overrides: Any) -> Settings:
    settings = make_settings(
        **{
            "model__path": str(tiny_model_dir),
            "ray__num_workers": 2,
            "ray__num_gpus_per_worker": 1.0,
            "ops__port": 0,
            "shutdown__drain_timeout_s": 20.0,
            "batching__max_wait_ms": 20,
            **overrides,
        }
    )
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    return settings


def partition_split(fleet: WorkerFleet, timeout_s: float) -> list[WorkerStatus]:
    """Statuses once every partition is owned by exactly one worker (after the join rebalance settles)."""
    deadline = time.monotonic() + timeout_s
    statuses: list[WorkerStatus] = []
    while time.monotonic() < deadline:
        statuses = fleet.poll(timeout_s=5.0)
        owned = [p for s in statuses for p in s.assigned]
        if len(statuses) == len(fleet.slots) and len(owned) == PARTITIONS and len(set(owned)) == PARTITIONS:
            return statuses
        time.sleep(0.3)
    raise AssertionError(f"partitions never split cleanly: {[s.assigned for s in statuses]}")


def test_two_gpu_actors_split_the_partitions_and_every_event_gets_exactly_one_verdict(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path
) -> None:
    settings = stream_settings(make_settings, tiny_model_dir)
    stream = build_stream(
        1000, seed=5, repeat_ratio=0.3, image_ratio=0.02, malformed_ratio=0.01, id_prefix="ray"
    )
    at_ready: dict[str, Any] = {}

    def on_ready(fleet: WorkerFleet) -> None:
        at_ready["statuses"] = partition_split(fleet, timeout_s=60)
        at_ready["t"] = time.monotonic()
        produce(settings, stream.records, partitions=PARTITIONS)

    started = time.monotonic()
    report = run_until_drained(
        settings, expected_events=len(stream.records), timeout_s=300, ready_timeout_s=180, on_ready=on_ready
    )
    print(
        f"\n1000 events on 2 Ray actors: {report.elapsed_s:.1f}s in all, "
        f"{time.monotonic() - at_ready['t']:.1f}s from produce to drained (test {time.monotonic() - started:.1f}s)"
    )
    assert report.drained, report
    statuses = at_ready["statuses"]
    assert sorted(tuple(s.gpu_ids) for s in statuses) == [("0",), ("1",)]
    assert all(s.device == "cpu" for s in statuses)  # fake GPUs: no CUDA, so the engine runs on CPU
    owned = [set(s.assigned) for s in statuses]
    assert owned[0].isdisjoint(owned[1]) and all(owned)
    assert all(s.model_loaded for s in statuses)
    assert all(final.drained for final in report.final_statuses)

    verdict_ids = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    assert set(verdict_ids) == stream.valid_ids
    assert [eid for eid, n in verdict_ids.items() if n != 1] == []
    dead_letters = read_json(settings, settings.topics.dlq)
    assert len(dead_letters) == len(stream.malformed)


def test_an_actor_killed_mid_stream_restarts_and_every_event_still_gets_a_verdict(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path
) -> None:
    settings = stream_settings(make_settings, tiny_model_dir, batching__max_size=8)
    stream = build_stream(
        600, seed=9, repeat_ratio=0.2, image_ratio=0.0, malformed_ratio=0.0, id_prefix="kill"
    )
    killed: dict[str, Any] = {}

    def kill_when_busy(fleet: WorkerFleet) -> None:
        victim = fleet.slots[0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = ray.get(victim.actor.status.remote(), timeout=10)
            if status.counters["completed"] >= 20:
                killed["incarnation"] = status.incarnation
                killed["completed_before"] = status.counters["completed"]
                ray.kill(victim.actor, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
                return
            time.sleep(0.05)

    def on_ready(fleet: WorkerFleet) -> None:
        partition_split(fleet, timeout_s=60)
        killed["thread"] = threading.Thread(target=kill_when_busy, args=(fleet,), daemon=True)
        killed["thread"].start()
        produce(settings, stream.records, partitions=PARTITIONS)

    started = time.monotonic()
    report = run_until_drained(
        settings,
        expected_events=len(stream.records),
        timeout_s=300,
        ready_timeout_s=180,
        on_ready=on_ready,
        ready_again_timeout_s=180,  # on a busy machine the victim may still be reloading its model
    )
    killed["thread"].join(timeout=130)
    assert report.drained, report
    assert "incarnation" in killed, "the victim never got busy enough to be killed mid-stream"
    victim_final = next(s for s in report.final_statuses if s.worker_index == 0)
    assert victim_final.incarnation != killed["incarnation"]  # Ray restarted it

    verdict_ids = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    duplicates = sum(n - 1 for n in verdict_ids.values())
    print(
        f"\nkill mid-stream: killed after {killed['completed_before']} events; {len(stream.records)} events, "
        f"{duplicates} duplicate verdicts (at-least-once), restarts seen by the driver {report.restarts_seen}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert set(verdict_ids) == stream.valid_ids


def test_a_worker_whose_pipeline_dies_is_restarted_by_the_driver(
    ray_cluster: Any, make_settings: Any, tmp_path: Path
) -> None:
    # No model there: the pipeline thread fails at start while the actor process lives on.
    settings = make_settings(model__path=str(tmp_path / "no-model"), ray__num_workers=1, ops__port=0)
    fleet = WorkerFleet(settings)
    fleet.start()
    failures: list[str] = []
    incarnations: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while fleet.restarts_seen == 0:
            assert time.monotonic() < deadline, [s.status for s in fleet.slots]
            for status in fleet.poll(timeout_s=5.0):
                incarnations.add(status.incarnation)
                if status.failed:
                    failures.append(status.failed)
            time.sleep(0.3)
    finally:
        fleet.stop(deadline_s=5.0)
    assert failures, "the failed pipeline was never reported in status()"
    assert len(incarnations) >= 2  # the driver killed the actor and Ray started a new one


def test_split_pools_run_as_one_actor_group_each_and_every_event_gets_one_verdict_from_its_pool(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path, tiny_text_guard_dir: Path
) -> None:
    settings = make_settings(
        models={
            "text": {"path": str(tiny_text_guard_dir), "family": "llama-guard-3-1b"},
            "vision": {"path": str(tiny_model_dir), "family": "llama-guard-3-vision"},
        },
        routing={"text": "text", "image": "vision"},
        pools={
            "text": {"models": ["text"], "num_workers": 1, "num_gpus_per_worker": 1.0},
            "vision": {"models": ["vision"], "num_workers": 1, "num_gpus_per_worker": 1.0},
        },
        ops__port=0,
        shutdown__drain_timeout_s=20.0,
        batching__max_wait_ms=20,
    )
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq])
    stream = build_stream(
        300, seed=9, repeat_ratio=0.2, image_ratio=0.2, malformed_ratio=0.02, id_prefix="pools"
    )
    at_ready: dict[str, Any] = {}

    def on_ready(fleet: WorkerFleet) -> None:
        at_ready["statuses"] = fleet.poll(timeout_s=10.0)
        produce(settings, stream.records, partitions=PARTITIONS)

    report = run_until_drained(
        settings, expected_events=len(stream.records), timeout_s=300, ready_timeout_s=180, on_ready=on_ready
    )
    assert report.drained, report
    assert report.workers == 2
    pools = {s.pool: s for s in at_ready["statuses"]}
    assert set(pools) == {"text", "vision"}
    assert sorted(tuple(s.gpu_ids) for s in pools.values()) == [("0",), ("1",)]
    # Each pool's consumer group owns every partition: both pools read the whole topic.
    assert all(len(s.assigned) == PARTITIONS for s in pools.values())

    verdicts = read_json(settings, settings.topics.verdicts)
    ids = Counter(v["event_id"] for v in verdicts)
    assert set(ids) == stream.valid_ids and max(ids.values()) == 1
    families = {"text": "llama-guard-3-1b", "vision": "llama-guard-3-vision"}
    agree = Counter()
    for v in verdicts:
        want = "vision" if v["event_id"] in stream.image_ids else "text"
        assert (v["model"]["name"], v["model"]["family"]) == (want, families[want]), v["event_id"]
        agree[want] += v["decision"] == stream.decisions[v["event_id"]]
    text_total = len(stream.valid_ids - stream.image_ids)
    # Real decisions: the tiny text guard follows the toy policy on about 9 in 10 items, the Vision one more.
    assert agree["text"] >= 0.85 * text_total and agree["vision"] >= 0.85 * len(stream.image_ids), agree
    assert len(read_json(settings, settings.topics.dlq)) == len(stream.malformed)
    finals = {f.pool: f.counters for f in report.final_statuses}
    assert finals["vision"]["dead_letters"] == 0, "the text pool owns the dead letters of undecodable input"


def test_a_wave_of_repeats_on_a_ray_actor_is_answered_by_its_intake_process(
    ray_cluster: Any, make_settings: Any, tiny_model_dir: Path
) -> None:
    """The intake process starts inside the actor (its own interpreter, launched from the actor's) and answers hits."""
    settings = stream_settings(make_settings, tiny_model_dir, ray__num_workers=1)
    seed = build_stream(20, seed=9, repeat_ratio=0.0, image_ratio=0.0, malformed_ratio=0.0, id_prefix="seed")

    def wave(name: str, n: int) -> list[tuple[bytes | None, bytes]]:
        records = [seed.records[i % len(seed.records)] for i in range(n)]
        return [
            (key, orjson.dumps(dict(orjson.loads(value), event_id=f"{name}-{i}")))
            for i, (key, value) in enumerate(records)
        ]

    first, second = wave("first", 1000), wave("second", 3000)
    fleet = WorkerFleet(settings)
    fleet.start()

    def completed_at_least(n: int, what: str, *, processes: int = 0) -> WorkerStatus:
        deadline = time.monotonic() + 180
        while True:
            statuses = fleet.poll(timeout_s=5.0)
            done = [
                s
                for s in statuses
                if s.pipeline is not None
                and s.counters.get("completed", 0) >= n
                and s.pipeline.intake_processes >= processes
            ]
            if done:
                return done[0]
            assert time.monotonic() < deadline, (what, [s.counters for s in statuses])
            time.sleep(0.3)

    try:
        produce(settings, seed.records, partitions=PARTITIONS)  # first: their verdicts fill the cache
        completed_at_least(len(seed.records), "the seed answered")
        produce(settings, first, partitions=PARTITIONS)  # a burst: the actor starts its intake process
        completed_at_least(
            len(seed.records) + len(first), "the first wave answered and the process ready", processes=1
        )
        produce(settings, second, partitions=PARTITIONS)
        status = completed_at_least(len(seed.records) + len(first) + len(second), "the second wave answered")
    finally:
        fleet.stop()
    assert status.counters["intake_process_answers"] > 0, status.counters
    assert status.counters["cached"] == len(first) + len(second) and status.counters["dead_letters"] == 0
    verdicts = Counter(v["event_id"] for v in read_json(settings, settings.topics.verdicts))
    assert {f"second-{i}" for i in range(len(second))} <= set(verdicts)
    assert max(verdicts.values()) == 1  # one verdict per event, whichever path answered it
