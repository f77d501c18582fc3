"""Stream pipeline throughput against its baselines, measured in one run on the embedded services.

    .venv/bin/python benchmarks/bench_stream.py [--scale 1.0]

Prints events/s and the ratios of issue 4 (goals in brackets):
- P1 cache-hit path ÷ a raw kafka-python consume→produce→commit loop on the same broker  [≥ 0.8]
- P2 text-only events ÷ the engine's bare batched scoring (prepare+run) at the same batch size  [≥ 0.8]
- P3 text-only events ÷ a naive loop: consume one, generate, produce, commit  [≥ 10×]
- P5 image events ÷ the slower of image preparation alone and the model alone  [≥ 0.8]

Pipeline rates run from the first consumed record to the moment every offset is committed (so they
include publishing, acks and commits; not the group join). Counts are bounded (``--scale``) so the
script finishes in a few minutes on the tiny CPU checkpoint. Starts its own broker and Redis.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import threading
import time
import uuid
from typing import Any

import orjson
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from worker.config import Settings, load_settings
from worker.decode import decode_event
from worker.dev_services import EmbeddedServices
from worker.engine.engine import GuardEngine
from worker.engine.types import GuardRequest
from worker.images.load import decode_image, image_bytes
from worker.stream.kafka_clients import consumer_config, ensure_topics, make_producer
from worker.stream.pipeline import StreamPipeline
from worker.tiny_model.build import ensure_tiny_model
from worker.tiny_model.synthetic import synthetic_examples

PARTITIONS = 4
TIMEOUT_S = 600.0


def fresh_settings(base: dict[str, Any], **overrides: Any) -> Settings:
    """Settings with topics and a group of their own (one benchmark phase)."""
    tag = uuid.uuid4().hex[:8]
    own = {
        "topics__events": f"bench.events.{tag}",
        "topics__verdicts": f"bench.verdicts.{tag}",
        "topics__flagged": f"bench.flagged.{tag}",
        "topics__dlq": f"bench.dlq.{tag}",
        "kafka__group_id": f"bench-{tag}",
        "redis__key_prefix": f"bench:{tag}:",
    }
    return load_settings(None, **{**base, **own, **overrides})


def uniquify(event: dict[str, Any], i: int) -> dict[str, Any]:
    """A copy of ``event`` with a new id and a distinct last text (so neither cache nor dedupe applies)."""
    event = orjson.loads(orjson.dumps(event))
    event["event_id"] = f"bench-{i}"
    last = event["messages"][-1]
    if isinstance(last["content"], str):
        last["content"] += f" (#{i})"
    else:
        for part in last["content"]:
            if part["type"] == "text":
                part["text"] += f" (#{i})"
                break
        else:
            last["content"].append({"type": "text", "text": f"(#{i})"})
    return event


def events(n: int, *, images: bool, seed: int, unique: bool = True) -> list[dict[str, Any]]:
    """``n`` synthetic events, all with or all without an image."""
    pool = [
        e
        for e in synthetic_examples(n * (12 if images else 2) + 50, seed=seed, split="train")
        if e.has_image == images
    ]
    if len(pool) < n and unique:
        pool = pool * (n // max(1, len(pool)) + 1)
    return [
        uniquify(pool[i % len(pool)].event, i)
        if unique
        else dict(pool[i % len(pool)].event, event_id=f"bench-{i}")
        for i in range(n)
    ]


def produce(settings: Settings, values: list[bytes]) -> None:
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    producer = make_producer(settings)
    for i, value in enumerate(values):
        producer.send(settings.topics.events, value=value, partition=i % PARTITIONS)
    producer.flush(timeout=120)
    producer.close(timeout=10)


def run_pipeline(settings: Settings, engine: GuardEngine, n: int) -> float:
    """Events/s of a StreamPipeline over ``n`` pre-produced events (first consume → all committed)."""
    pipeline = StreamPipeline(settings, engine, worker_name="bench")
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    started = None
    try:
        while time.monotonic() < deadline:
            status = pipeline.status()
            if started is None and status["counters"]["consumed"] > 0:
                started = time.perf_counter()
            if status["counters"]["completed"] >= n and status["all_committed"]:
                break
            time.sleep(0.005)
        else:
            raise TimeoutError(f"pipeline did not finish {n} events: {pipeline.status()}")
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        pipeline.request_stop()
        thread.join(60)
    counters = pipeline.status()["counters"]
    print(
        f"  pipeline: {n} events in {elapsed:.2f}s, {counters['batches']} model batches, {counters['cached']} cached"
    )
    return n / elapsed


def raw_loop(settings: Settings, n: int) -> float:
    """A raw kafka-python consume→produce→commit loop (per poll: produce each, flush, commit)."""
    consumer = KafkaConsumer(settings.topics.events, **consumer_config(settings))
    producer = make_producer(settings)
    done = 0
    started = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while done < n and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=100)
            if not batch:
                continue
            started = started or time.perf_counter()
            offsets = {}
            for tp, records in batch.items():
                for r in records:
                    producer.send(settings.topics.verdicts, key=r.key, value=r.value)
                offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                done += len(records)
            producer.flush(timeout=60)
            consumer.commit(offsets)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=10)
    return done / elapsed


def naive_loop(settings: Settings, engine: GuardEngine, n: int) -> float:
    """Consume one record, decode, generate (batch 1, full greedy answer), produce, flush, commit — per record."""
    consumer = KafkaConsumer(settings.topics.events, **{**consumer_config(settings), "max_poll_records": 1})
    producer = make_producer(settings)
    done = 0
    started = None
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while done < n and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=100, max_records=1)
            for tp, records in batch.items():
                for r in records:
                    started = started or time.perf_counter()
                    event = decode_event(r.value, settings)
                    policy = engine.policy_for(event.policy)
                    [result] = engine.run(engine.prepare([GuardRequest(event.turns, policy)]))
                    producer.send(
                        settings.topics.verdicts,
                        value=orjson.dumps(
                            {"event_id": event.event_id, "unsafe": getattr(result, "unsafe", None)}
                        ),
                    )
                    producer.flush(timeout=60)
                    consumer.commit({tp: OffsetAndMetadata(r.offset + 1, "", -1)})
                    done += 1
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=10)
    return done / elapsed


def requests_for(
    settings: Settings, engine: GuardEngine, evs: list[dict[str, Any]]
) -> list[tuple[Any, bytes | None]]:
    out = []
    for e in evs:
        event = decode_event(orjson.dumps(e), settings)
        data = image_bytes(event.image, settings) if event.image is not None else None
        out.append((event, data))
    return out


def bare_scoring(settings: Settings, engine: GuardEngine, evs: list[dict[str, Any]]) -> float:
    """Events/s of engine.prepare + engine.run over the same events in batches of batching.max_size."""
    decoded = requests_for(settings, engine, evs)
    requests = [GuardRequest(e.turns, engine.policy_for(e.policy)) for e, _ in decoded]
    size = settings.batching.max_size
    start = time.perf_counter()
    for i in range(0, len(requests), size):
        engine.run(engine.prepare(requests[i : i + size]))
    return len(requests) / (time.perf_counter() - start)


def image_stages(settings: Settings, engine: GuardEngine, evs: list[dict[str, Any]]) -> tuple[float, float]:
    """(preparation alone, model alone) events/s for image events, at the pipeline's batch size and threads."""
    decoded = requests_for(settings, engine, evs)
    size = settings.batching.max_size
    chunks = [decoded[i : i + size] for i in range(0, len(decoded), size)]

    def prepare(chunk: list[tuple[Any, bytes | None]]) -> Any:
        reqs = [
            GuardRequest(e.turns, engine.policy_for(e.policy), decode_image(d, settings.limits))
            for e, d in chunk
        ]
        return engine.prepare(reqs)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(settings.batching.prepare_threads) as pool:
        prepared = list(pool.map(prepare, chunks))
    prep_rate = len(decoded) / (time.perf_counter() - start)
    start = time.perf_counter()
    for batch in prepared:
        engine.run(batch)
    model_rate = len(decoded) / (time.perf_counter() - start)
    return prep_rate, model_rate


def in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a fresh thread, as the pipeline runs its loop: torch's intra-op thread pool behaves
    differently on the main thread of a busy machine, and baselines must run under the same conditions."""
    with cf.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:
    """Run every phase and print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every event count")
    parser.add_argument("--only", default="p1,p2,p3,p5", help="comma-separated phases to run (p3 needs p2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_hit, n_text, n_naive, n_image = (max(20, int(c * args.scale)) for c in (5000, 1000, 100, 300))
    model_dir = ensure_tiny_model(train=True)
    with EmbeddedServices() as services:
        base = {
            "kafka__bootstrap_servers": [services.kafka_bootstrap],
            "kafka__session_timeout_ms": 3000,
            "kafka__heartbeat_interval_ms": 1000,
            "redis__url": services.redis_url,
            "model__path": str(model_dir),
            "model__device": "cpu",
        }
        engine = GuardEngine.from_settings(load_settings(None, **base))
        size = engine.max_batch_size
        print(
            f"tiny checkpoint {engine.model_info.id} on {engine.device}; batch size {size}; "
            f"events: hit {n_hit}, text {n_text}, naive {n_naive}, image {n_image}"
        )
        results: dict[str, float] = {}

        phases = set(args.only.split(","))
        if "p3" in phases:
            phases.add("p2")
        if "p1" in phases:
            p1(base, engine, n_hit, results)
        if "p2" in phases:
            p2_p3(base, engine, n_text, n_naive if "p3" in phases else 0, results)
        if "p5" in phases:
            p5(base, engine, n_image, results)

    report(results)
    return 0


def p1(base: dict[str, Any], engine: GuardEngine, n_hit: int, results: dict[str, float]) -> None:
    """P1: every event a cache hit (the cache is warmed by a first pass over the distinct contents)."""
    distinct = events(100, images=False, seed=1)
    warm = fresh_settings(base)
    produce(warm, [orjson.dumps(e) for e in distinct])
    run_pipeline(warm, engine, len(distinct))
    hits = fresh_settings(base, redis__key_prefix=warm.redis.key_prefix)
    produce(
        hits, [orjson.dumps(dict(distinct[i % len(distinct)], event_id=f"hit-{i}")) for i in range(n_hit)]
    )
    results["p1_pipeline"] = run_pipeline(hits, engine, n_hit)
    raw = fresh_settings(base)
    produce(raw, [orjson.dumps(dict(distinct[i % len(distinct)], event_id=f"raw-{i}")) for i in range(n_hit)])
    ensure_topics(raw, [raw.topics.verdicts])
    results["p1_raw_loop"] = in_thread(raw_loop, raw, n_hit)


def p2_p3(
    base: dict[str, Any], engine: GuardEngine, n_text: int, n_naive: int, results: dict[str, float]
) -> None:
    """P2/P3: unique text-only events, cache off (every event goes through the model)."""
    text_events = events(n_text, images=False, seed=2)
    text = fresh_settings(base, redis__enabled=False)
    produce(text, [orjson.dumps(e) for e in text_events])
    results["p2_pipeline"] = run_pipeline(text, engine, n_text)
    results["p2_bare_scoring"] = in_thread(bare_scoring, text, engine, text_events)
    if not n_naive:
        return
    generate_engine = GuardEngine.from_settings(load_settings(None, **base, model__mode="generate"))
    naive = fresh_settings(base, model__mode="generate")
    produce(naive, [orjson.dumps(e) for e in text_events[:n_naive]])
    ensure_topics(naive, [naive.topics.verdicts])
    results["p3_naive_loop"] = in_thread(naive_loop, naive, generate_engine, n_naive)


def p5(base: dict[str, Any], engine: GuardEngine, n_image: int, results: dict[str, float]) -> None:
    """P5: unique image events, cache off."""
    image_events = events(n_image, images=True, seed=3)
    image = fresh_settings(base, redis__enabled=False)
    produce(image, [orjson.dumps(e) for e in image_events])
    results["p5_pipeline"] = run_pipeline(image, engine, n_image)
    prep_rate, model_rate = in_thread(image_stages, image, engine, image_events)
    results["p5_prepare_alone"], results["p5_model_alone"] = prep_rate, model_rate


def report(r: dict[str, float]) -> None:
    """Print every figure and the ratios that can be formed from them."""
    print()
    for name, value in r.items():
        print(f"{name:<20} {value:10.1f} events/s")
    print()
    if "p1_raw_loop" in r:
        print(
            f"P1 cache-hit pipeline / raw loop      = {r['p1_pipeline'] / r['p1_raw_loop']:.2f}  (goal >= 0.8)"
        )
    if "p2_bare_scoring" in r:
        print(
            f"P2 text pipeline / bare scoring       = {r['p2_pipeline'] / r['p2_bare_scoring']:.2f}  (goal >= 0.8)"
        )
    if "p3_naive_loop" in r:
        print(
            f"P3 text pipeline / naive loop         = {r['p2_pipeline'] / r['p3_naive_loop']:.1f}x (goal >= 10x)"
        )
    if "p5_model_alone" in r:
        slower = min(r["p5_prepare_alone"], r["p5_model_alone"])
        print(f"P5 image pipeline / slower stage      = {r['p5_pipeline'] / slower:.2f}  (goal >= 0.8)")


if __name__ == "__main__":
    raise SystemExit(main())
