"""Stream pipeline throughput against its baselines, measured in one run on the embedded services.

    .venv/bin/python benchmarks/bench_stream.py [--scale 1.0] [--repeat 1] [--only p1,p2,p3,p5]
                                                [--set batching__max_size=64 ...]

Prints a table of events/s and the ratios of issue 4 (goals in brackets):
- P1 cache-hit path ÷ a raw kafka-python consume→produce→commit loop on the same broker  [≥ 0.8]
- P2 text-only events ÷ the engine's bare batched scoring (prepare+run) at the same batch size  [≥ 0.8]
- P3 text-only events ÷ a naive loop: consume one, generate, produce, commit  [≥ 10×]
- P5 image events ÷ the slower of image preparation alone and the model alone  [≥ 0.8]

What is compared (so that neither side is favoured):
- Every Kafka client in every phase uses the same ``kafka_clients`` configuration (producer: acks=all,
  idempotence, compression, linger, batch size; consumer: max_poll_records), on the same broker.
- Output topics exist before any timed phase (``moderation-worker run`` creates them before it starts),
  and every producer knows their metadata before its clock starts — the pipeline fetches it while it
  joins its group, the raw loops by asking for it first. Without that, the first send to each new
  topic waits ≈100 ms on tansu's metadata backoff, a fixed cost that dominated short runs.
- P1's baseline sends exactly the records the pipeline sent (read back from the pipeline's verdicts
  topic): same values, keys (``conversation_id``), headers, and the extra copy of each unsafe verdict
  to the flagged topic (≈1.5 records per event). The "echo" loop of earlier versions (each input
  record sent back once, unkeyed, without headers) is printed too, for reference: it does less Kafka
  work than the product has to do, so it is not the denominator of the goal.
- P5 also prints the CPU time per event of each stage alone (all threads): on a machine with few
  cores the two stages cannot overlap for free, and ``cores ÷ (CPU ms of both)`` bounds the pipeline.

Pipeline rates run from the first consumed record to the moment every offset is committed (so they
include publishing, acks and the commit interval; not the group join). Raw loops run from their first
polled record to their last commit. ``--repeat`` runs each timed figure that many times and keeps the
best (the machine is shared and noisy). Starts its own broker and Redis.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import Settings, load_settings
from worker.contracts.decode import decode_event
from worker.dev.services import EmbeddedServices
from worker.dev.tiny_model.build import ensure_tiny_model
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.engine.engine import GuardEngine
from worker.engine.types import GuardRequest
from worker.images.load import decode_image, image_bytes
from worker.stream.kafka_clients import consumer_config, ensure_topics, make_producer
from worker.stream.pipeline import StreamPipeline

PARTITIONS = 4
TIMEOUT_S = 600.0

# (topic, key, value, headers) of one output record; keyed by the (partition, offset) of its input.
OutputRecord = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]


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


def output_topics(settings: Settings) -> list[str]:
    """The topics a pipeline on ``settings`` publishes to."""
    return [settings.topics.verdicts, settings.topics.flagged, settings.topics.dlq]


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
    """Create the events topic and its outputs; write ``values`` round-robin (record i → partition i % 4)."""
    ensure_topics(settings, [settings.topics.events], partitions=PARTITIONS)
    ensure_topics(settings, output_topics(settings))
    producer = make_producer(settings)
    for i, value in enumerate(values):
        producer.send(settings.topics.events, value=value, partition=i % PARTITIONS)
    producer.flush(timeout=120)
    producer.close(timeout=10)


def best_of(repeat: int, measure: Callable[[], float]) -> float:
    """The highest of ``repeat`` measurements (each on its own topics): the least disturbed by other load."""
    return max(measure() for _ in range(repeat))


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
        f"  pipeline: {n} events in {elapsed:.2f}s, {counters['batches']} model batches, "
        f"{counters['cached']} cached",
        flush=True,
    )
    return n / elapsed


def read_outputs(settings: Settings, n: int) -> dict[tuple[int, int], list[OutputRecord]]:
    """The records the pipeline published for each input (partition, offset), read back from the verdicts topic.

    The flagged topic holds byte-identical copies of the unsafe verdicts (``Publisher.publish_verdict``),
    so those are rebuilt from the verdicts rather than read twice.
    """
    config = {**consumer_config(settings), "group_id": None, "auto_offset_reset": "earliest"}
    consumer = KafkaConsumer(**config)
    topic = settings.topics.verdicts
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}])
    outputs: dict[tuple[int, int], list[OutputRecord]] = {}
    deadline = time.monotonic() + 60
    try:
        while len(outputs) < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    verdict = orjson.loads(r.value)
                    headers = [(k, v) for k, v in r.headers]
                    copies = [settings.topics.verdicts] + (
                        [settings.topics.flagged] if verdict["flagged"] else []
                    )
                    source = (verdict["source"]["partition"], verdict["source"]["offset"])
                    outputs[source] = [(t, r.key, r.value, headers) for t in copies]
    finally:
        consumer.close(autocommit=False)
    if len(outputs) < n:
        raise TimeoutError(f"read back {len(outputs)} of {n} verdicts")
    return outputs


def raw_loop(
    settings: Settings,
    n: int,
    outputs: dict[tuple[int, int], list[OutputRecord]] | None = None,
    renamed: dict[str, str] | None = None,
) -> float:
    """A raw kafka-python consume→produce→commit loop (per poll: produce, flush, commit).

    With ``outputs``, each consumed record is answered with the records the pipeline sent for the same
    (partition, offset) — topics renamed by ``renamed`` to this phase's own. Without, it is echoed
    once to the verdicts topic (unkeyed, no headers).
    """
    consumer = KafkaConsumer(settings.topics.events, **consumer_config(settings))
    producer = make_producer(settings)
    for topic in output_topics(settings):  # learn the outputs' metadata before the clock starts
        producer.partitions_for(topic)
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
                if outputs is None:
                    for r in records:
                        producer.send(settings.topics.verdicts, key=r.key, value=r.value)
                else:
                    assert renamed is not None
                    for r in records:
                        for topic, key, value, headers in outputs[(tp.partition, r.offset)]:
                            producer.send(renamed[topic], key=key, value=value, headers=headers)
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
    producer.partitions_for(settings.topics.verdicts)
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


def image_stages(
    settings: Settings, engine: GuardEngine, evs: list[dict[str, Any]]
) -> tuple[float, float, float, float]:
    """Image events alone, at the pipeline's batch size and threads: (prepare events/s, model events/s,
    prepare CPU ms/event, model CPU ms/event). CPU time is the whole process's, all threads."""
    decoded = requests_for(settings, engine, evs)
    size = settings.batching.max_size
    chunks = [decoded[i : i + size] for i in range(0, len(decoded), size)]

    def prepare(chunk: list[tuple[Any, bytes | None]]) -> Any:
        reqs = [
            GuardRequest(e.turns, engine.policy_for(e.policy), decode_image(d, settings.limits))
            for e, d in chunk
        ]
        return engine.prepare(reqs)

    start, cpu = time.perf_counter(), time.process_time()
    with cf.ThreadPoolExecutor(settings.batching.prepare_threads) as pool:
        prepared = list(pool.map(prepare, chunks))
    prep_rate = len(decoded) / (time.perf_counter() - start)
    prep_cpu_ms = (time.process_time() - cpu) * 1000 / len(decoded)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in prepared:
        engine.run(batch)
    model_rate = len(decoded) / (time.perf_counter() - start)
    model_cpu_ms = (time.process_time() - cpu) * 1000 / len(decoded)
    return prep_rate, model_rate, prep_cpu_ms, model_cpu_ms


def in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a fresh thread, as the pipeline runs its loop: torch's intra-op thread pool behaves
    differently on the main thread of a busy machine, and baselines must run under the same conditions."""
    with cf.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:
    """Run every phase and print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every event count")
    parser.add_argument("--repeat", type=int, default=1, help="run each timed figure N times, keep the best")
    parser.add_argument("--only", default="p1,p2,p3,p5", help="comma-separated phases to run (p3 needs p2)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION__FIELD=VALUE",
        help="a settings override for every phase and baseline, e.g. batching__max_size=64 (repeatable)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_hit, n_text, n_naive, n_image = (max(20, int(c * args.scale)) for c in (20000, 2000, 100, 600))
    model_dir = ensure_tiny_model(train=True)
    with EmbeddedServices() as services:
        base = {
            "kafka__bootstrap_servers": [services.kafka_bootstrap],
            "kafka__session_timeout_ms": 3000,
            "kafka__heartbeat_interval_ms": 1000,
            "redis__url": services.redis_url,
            "model__path": str(model_dir),
            "model__device": "cpu",
            **dict(item.split("=", 1) for item in args.set),
        }
        engine = GuardEngine.from_settings(load_settings(None, **base))
        import torch

        print(
            f"tiny checkpoint {engine.model_info.id} on {engine.device}; batch size {engine.max_batch_size}; "
            f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}; "
            f"events: hit {n_hit}, text {n_text}, naive {n_naive}, image {n_image}; best of {args.repeat}",
            flush=True,
        )
        results: dict[str, float] = {}

        phases = set(args.only.split(","))
        if "p3" in phases:
            phases.add("p2")
        if "p1" in phases:
            p1(base, engine, n_hit, args.repeat, results)
        if "p2" in phases:
            p2_p3(base, engine, n_text, n_naive if "p3" in phases else 0, args.repeat, results)
        if "p5" in phases:
            p5(base, engine, n_image, args.repeat, results)

    report(results)
    return 0


def p1(base: dict[str, Any], engine: GuardEngine, n_hit: int, repeat: int, results: dict[str, float]) -> None:
    """P1: every event a cache hit (the cache is warmed by a first pass over the distinct contents)."""
    distinct = events(100, images=False, seed=1)
    warm = fresh_settings(base)
    produce(warm, [orjson.dumps(e) for e in distinct])
    run_pipeline(warm, engine, len(distinct))
    values = [orjson.dumps(dict(distinct[i % len(distinct)], event_id=f"hit-{i}")) for i in range(n_hit)]
    last_hits: list[Settings] = []

    def pipeline() -> float:
        hits = fresh_settings(base, redis__key_prefix=warm.redis.key_prefix)
        produce(hits, values)
        last_hits[:] = [hits]
        return run_pipeline(hits, engine, n_hit)

    def raw(same_outputs: bool) -> float:
        settings = fresh_settings(base)
        produce(settings, values)  # same records, same partitions and offsets as the pipeline's input
        renamed = dict(zip(output_topics(last_hits[0]), output_topics(settings), strict=True))
        return in_thread(raw_loop, settings, n_hit, outputs if same_outputs else None, renamed)

    results["p1_pipeline"] = best_of(repeat, pipeline)
    outputs = read_outputs(last_hits[0], n_hit)
    flagged = sum(len(records) - 1 for records in outputs.values())
    print(f"  pipeline outputs: {n_hit} verdicts + {flagged} flagged copies, read back", flush=True)
    results["p1_raw_same_outputs"] = best_of(repeat, lambda: raw(True))
    results["p1_raw_echo"] = best_of(repeat, lambda: raw(False))


def p2_p3(
    base: dict[str, Any],
    engine: GuardEngine,
    n_text: int,
    n_naive: int,
    repeat: int,
    results: dict[str, float],
) -> None:
    """P2/P3: unique text-only events, cache off (every event goes through the model)."""
    text_events = events(n_text, images=False, seed=2)
    values = [orjson.dumps(e) for e in text_events]

    def pipeline() -> float:
        text = fresh_settings(base, redis__enabled=False)
        produce(text, values)
        return run_pipeline(text, engine, n_text)

    results["p2_pipeline"] = best_of(repeat, pipeline)
    bare = fresh_settings(base, redis__enabled=False)
    results["p2_bare_scoring"] = best_of(repeat, lambda: in_thread(bare_scoring, bare, engine, text_events))
    if not n_naive:
        return
    generate_engine = GuardEngine.from_settings(load_settings(None, **base, model__mode="generate"))

    def naive() -> float:
        settings = fresh_settings(base, model__mode="generate")
        produce(settings, values[:n_naive])
        return in_thread(naive_loop, settings, generate_engine, n_naive)

    results["p3_naive_loop"] = best_of(repeat, naive)


def p5(
    base: dict[str, Any], engine: GuardEngine, n_image: int, repeat: int, results: dict[str, float]
) -> None:
    """P5: unique image events, cache off."""
    image_events = events(n_image, images=True, seed=3)
    values = [orjson.dumps(e) for e in image_events]

    def pipeline() -> float:
        image = fresh_settings(base, redis__enabled=False)
        produce(image, values)
        return run_pipeline(image, engine, n_image)

    results["p5_pipeline"] = best_of(repeat, pipeline)
    stages = fresh_settings(base, redis__enabled=False)
    runs = [in_thread(image_stages, stages, engine, image_events) for _ in range(repeat)]
    results["p5_prepare_alone"] = max(r[0] for r in runs)
    results["p5_model_alone"] = max(r[1] for r in runs)
    results["p5_prepare_cpu_ms"] = min(r[2] for r in runs)
    results["p5_model_cpu_ms"] = min(r[3] for r in runs)


def report(r: dict[str, float]) -> None:
    """Print every figure, then the ratios of issue 4 as a table."""
    print()
    print(f"{'figure':<24} {'value':>10}")
    for name, value in r.items():
        unit = "CPU ms/event" if name.endswith("_cpu_ms") else "events/s"
        print(
            f"{name:<24} {value:10.2f} {unit}"
            if unit.startswith("CPU")
            else f"{name:<24} {value:10.1f} {unit}"
        )
    rows: list[tuple[str, float, float, str]] = []  # (ratio, value, goal, note)
    if "p1_raw_same_outputs" in r:
        rows.append(
            (
                "P1 cache hits / raw loop, same output records",
                r["p1_pipeline"] / r["p1_raw_same_outputs"],
                0.8,
                "",
            )
        )
        rows.append(
            (
                "   (for reference: / raw echo loop)",
                r["p1_pipeline"] / r["p1_raw_echo"],
                0.0,
                "1 unkeyed record/event, no headers",
            )
        )
    if "p2_bare_scoring" in r:
        rows.append(
            ("P2 text pipeline / bare batched scoring", r["p2_pipeline"] / r["p2_bare_scoring"], 0.8, "")
        )
    if "p3_naive_loop" in r:
        rows.append(("P3 text pipeline / naive loop", r["p2_pipeline"] / r["p3_naive_loop"], 10.0, ""))
        ceiling = r["p2_bare_scoring"] / r["p3_naive_loop"]
        rows.append(("   (ceiling: bare batched scoring / naive loop)", ceiling, 0.0, "no Kafka, no decode"))
    if "p5_model_alone" in r:
        slower = min(r["p5_prepare_alone"], r["p5_model_alone"])
        rows.append(("P5 image pipeline / slower stage alone", r["p5_pipeline"] / slower, 0.8, ""))
        cores = os.cpu_count() or 1
        bound = 1000 * cores / (r["p5_prepare_cpu_ms"] + r["p5_model_cpu_ms"])
        note = f"CPU bound: {cores} cores / ({r['p5_prepare_cpu_ms']:.2f}+{r['p5_model_cpu_ms']:.2f}) ms"
        rows.append(("   (ceiling from CPU time of both stages)", min(bound, slower) / slower, 0.0, note))
    print()
    print(f"{'ratio':<48} {'value':>7} {'goal':>7}  met  note")
    for name, value, goal, note in rows:
        if goal:
            met = "yes" if value >= goal else "NO"
            print(f"{name:<48} {value:7.2f} {'>= ' + format(goal, 'g'):>7}  {met:<4} {note}")
        else:
            print(f"{name:<48} {value:7.2f} {'':>7}  {'':<4} {note}")


if __name__ == "__main__":
    raise SystemExit(main())
