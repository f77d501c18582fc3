"""Prometheus metrics of the worker: one module-level object per metric, all on ``REGISTRY``.

Registry choice: a dedicated ``CollectorRegistry`` (``REGISTRY``), not prometheus_client's global one.
Why: Ray, transformers and test helpers may import prometheus_client and register their own collectors
in the default registry of the same process; a private registry keeps ``/metrics`` to exactly the
worker's metrics (plus process/platform/GC collectors, registered here explicitly) and lets tests read
values without interference. Everything that serves or reads metrics uses ``REGISTRY``.

Naming follows the Prometheus conventions: ``mw_`` namespace, counters end in ``_total``, time is in
seconds (``_seconds``), one unit per metric. Label values are always from closed sets (outcomes, reason
codes, category codes, stage names, modality, configured model names) so cardinality stays bounded; ``mw_consumer_lag`` is per
assigned ``topic``/``partition`` and is cleared with ``forget_partition`` on revocation.

Known label values are pre-initialised to zero so that ``rate()`` and dashboards see a series from the
first scrape, not only after the first increment.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector

from worker.config import CATEGORY_CODES
from worker.contracts.rejections import Reason

REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
# The Ray driver's own registry (what `run --ray` serves on ops.port): only what the driver knows. Serving
# REGISTRY there would export the pipeline's gauges at their idle values (e.g. mw_redis_up 0) next to the
# actors' real ones and pull every min()/sum() on the dashboard off.
DRIVER_REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=DRIVER_REGISTRY)

NAMESPACE: Final = "mw"

# Closed label sets (pre-initialised; the pipeline must only use these values).
OUTCOMES: Final = ("verdict", "dead_letter", "cached")
DECISIONS: Final = ("safe", "unsafe")
CACHE_RESULTS: Final = ("hit", "miss", "error")
OUTAGE_CAUSES: Final = ("engine", "delivery")
STAGES: Final = ("decode", "cache", "prepare", "model", "publish", "commit")
MODALITIES: Final = ("text", "image")
BATCH_MODALITIES: Final = (*MODALITIES, "mixed")  # a batch of a model that mixes modalities may hold both
NO_CATEGORY: Final = "none"  # category label of safe verdicts
DEFAULT_MODEL: Final = "default"  # model label of a single-model worker (the ``model`` section)

# Buckets. Per-stage work ranges from ~0.1 ms (decode, cache) to seconds (model on a large image batch).
STAGE_BUCKETS_SECONDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# End-to-end = broker timestamp of the record → verdict published; includes queueing and batching waits.
END_TO_END_BUCKETS_SECONDS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# Batch sizes: powers of two up to the config maximum (batching.max_size <= 4096).
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

EVENTS_CONSUMED = Counter(
    "events_consumed_total",
    "Records consumed from the events topic, by how they ended: a verdict from the model, a cached verdict, "
    "or a dead letter.",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
VERDICTS = Counter(
    "verdicts_total",
    "Verdicts produced (model or cache), by judging model (configured name), decision and category; a verdict "
    "with several categories counts once per category; safe verdicts use category 'none'.",
    ["model", "decision", "category"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
FLAGGED_EVENTS = Counter(
    "flagged_events_total",
    "Events whose verdict is unsafe (model or cache), counted once per event whatever its categories.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "dead_letters_total",
    "Dead letters published, by reason code (schemas/dead_letter.v1.json).",
    ["reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CACHE_REQUESTS = Counter(
    "cache_requests_total",
    "Verdict cache lookups by result: hit, miss, or error (Redis unreachable; the event runs uncached).",
    ["result"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "batch_size",
    "Events per model batch (forward pass), by model (configured name) and modality.",
    ["model", "modality"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=BATCH_SIZE_BUCKETS,
)
FORWARD_POSITIONS = Counter(
    "forward_positions_total",
    "Token positions computed by the stream's model forward passes (rows x padded length of each batch), by "
    "model and batch modality. Padding fraction = rate(mw_forward_padding_positions_total) / rate(this).",
    ["model", "modality"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
FORWARD_PADDING_POSITIONS = Counter(
    "forward_padding_positions_total",
    "Of mw_forward_positions_total, the positions that are padding (each row's shortfall to the batch's "
    "longest row): compute spent on nothing.",
    ["model", "modality"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "stage_seconds",
    "Wall time of one pipeline stage call (per batch for batched stages), by stage.",
    ["stage"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=STAGE_BUCKETS_SECONDS,
)
END_TO_END_SECONDS = Histogram(
    "end_to_end_seconds",
    "Time from the record's broker timestamp to its verdict or dead letter being published.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=END_TO_END_BUCKETS_SECONDS,
)
EVENT_LAG_SECONDS = Histogram(
    "event_lag_seconds",
    "Time from the event's own created_at (set by the producer) to its verdict being acknowledged: the lag a "
    "consumer of verdicts sees, including any delay before the event reached Kafka. Events without created_at "
    "are not counted.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=END_TO_END_BUCKETS_SECONDS,
)
REVIEW_BAND = Counter(
    "review_band_total",
    "Verdicts in a policy's human-review band (review_threshold <= score < threshold): decision safe, sent to "
    "the review topic.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
BLOCKLIST_HITS = Counter(
    "blocklist_hits_total",
    "Verdicts with a blocklist hit, by action: halt (decided without the model) or annotate (reported only).",
    ["action"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "consumer_lag",
    "Records behind the partition's high-water mark (high-water mark minus next offset to consume), per "
    "assigned partition. Computed from the high-water mark, not a LATEST offset lookup.",
    ["topic", "partition"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
IN_FLIGHT_EVENTS = Gauge(
    "in_flight_events",
    "Events consumed but not yet completed (verdict or dead letter acknowledged).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PAUSED_PARTITIONS = Gauge(
    "paused_partitions",
    "Assigned partitions currently paused (or held back, confluent-kafka) by backpressure.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "model_load_seconds",
    "Seconds the last model load took (processor + weights to device).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
REDIS_UP = Gauge(
    "redis_up",
    "1 when the verdict cache's Redis answered the last request, else 0.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
ENGINE_DROPPED_CODES = Counter(
    "engine_dropped_codes_total",
    "Category codes the model generated that the active policy does not contain (dropped from verdicts).",
    ["code"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DUPLICATES_SKIPPED = Counter(
    "duplicates_skipped_total",
    "Events skipped because an identical item in the same batch was classified once for all.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INTAKE_PROCESSES = Gauge(
    "intake_processes",
    "Intake processes ready to decode and answer cache hits off the loop thread (0 until the first burst).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PREPARATION_PROCESSES = Gauge(
    "preparation_processes",
    "Image preparation processes ready (batching.prepare_processes; unset: 0 until the first image backlog).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INTAKE_PROCESS_ANSWERS = Counter(
    "intake_process_answers_total",
    "Events an intake process answered (a cache hit or a halting blocklist) and published the verdict of "
    "(acknowledged by the broker).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
WORKER_READY = Gauge(
    "worker_ready",
    "1 when this worker is ready (model loaded and partitions assigned), else 0.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTAGE = Gauge(
    "outage",
    "1 while this worker has stopped consuming because a dependency keeps failing (cause: engine = whole batches "
    "fail in the model; delivery = outputs keep failing to reach the broker), else 0. Alert on it.",
    ["cause"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTAGES = Counter(
    "outages_total",
    "Outages declared (the worker paused consumption and reported not ready), by cause.",
    ["cause"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTAGE_RETRIES = Counter(
    "outage_retries_total",
    "Retries that failed while in an outage (engine: the held batch; delivery: a re-publish), by cause.",
    ["cause"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
REPLAYS_SKIPPED = Counter(
    "replays_skipped_total",
    "Records consumed again after a crash or rebalance whose answer the broker had already acknowledged "
    "(published marker found in Redis): completed without publishing a duplicate.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RAY_WORKERS_ALIVE = Gauge(
    "ray_workers_alive",
    "GuardWorker actors alive, as seen by the Ray driver.",
    namespace=NAMESPACE,
    registry=DRIVER_REGISTRY,
)
RAY_WORKERS_DESIRED = Gauge(
    "ray_workers_desired",
    "GuardWorker actors the Ray driver wants: ray.num_workers, or the lag autoscaler's current plan.",
    namespace=NAMESPACE,
    registry=DRIVER_REGISTRY,
)
GROUP_LAG = Gauge(
    "group_lag",
    "Records the consumer group has not committed on the events topic (end offsets minus committed), as the "
    "Ray driver reads it for autoscaling.",
    namespace=NAMESPACE,
    registry=DRIVER_REGISTRY,
)


def _preinitialise() -> None:
    """Create the zero-valued child of every known label value (see module docstring)."""
    for outcome in OUTCOMES:
        EVENTS_CONSUMED.labels(outcome=outcome)
    for reason in Reason:
        DEAD_LETTERS.labels(reason=reason.value)
    for code in CATEGORY_CODES:  # a policy that disables a category sees it dropped: visible from the start
        ENGINE_DROPPED_CODES.labels(code=code)
    for result in CACHE_RESULTS:
        CACHE_REQUESTS.labels(result=result)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage=stage)
    for cause in OUTAGE_CAUSES:
        OUTAGE.labels(cause=cause)
        OUTAGES.labels(cause=cause)
        OUTAGE_RETRIES.labels(cause=cause)
    for action in ("halt", "annotate"):
        BLOCKLIST_HITS.labels(action=action)

    register_models([DEFAULT_MODEL])


def register_models(names: list[str]) -> None:
    """Pre-initialise the per-model series of the configured models (called when a worker loads them)."""
    for model in names:
        VERDICTS.labels(model=model, decision="safe", category=NO_CATEGORY)
        for code in CATEGORY_CODES:
            VERDICTS.labels(model=model, decision="unsafe", category=code)
        for modality in BATCH_MODALITIES:
            BATCH_SIZE.labels(model=model, modality=modality)
            FORWARD_POSITIONS.labels(model=model, modality=modality)
            FORWARD_PADDING_POSITIONS.labels(model=model, modality=modality)


_preinitialise()


@contextmanager
def observe_stage(stage: str) -> Iterator[None]:
    """Time the ``with`` block into ``mw_stage_seconds{stage=...}`` (also when it raises).

    ``stage`` must be one of ``STAGES``; an unknown name is a bug and raises ``ValueError`` at once.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    child = STAGE_SECONDS.labels(stage=stage)
    start = time.perf_counter()
    try:
        yield
    finally:
        child.observe(time.perf_counter() - start)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, in one pass: one add to the sum and one per bucket touched.

    ``observe`` takes a lock per value for the sum and one for the bucket; per event on the loop thread that
    was ≈ 8% of its time on the cache-hit path. The buckets are prometheus_client's own (an unlabelled
    histogram, or one child of a labelled one); without them (another client version) it observes one by one.
    """
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe() picks (+Inf last)
    total.inc(sum(values))
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def record_padding(model: str, modality: str, padding: int, computed: int) -> None:
    """Count one forward pass's computed token positions and the padding among them."""
    FORWARD_POSITIONS.labels(model=model, modality=modality).inc(computed)
    FORWARD_PADDING_POSITIONS.labels(model=model, modality=modality).inc(padding)


def record_verdict(
    decision: str, category_codes: tuple[str, ...] | list[str], *, cached: bool, model: str = DEFAULT_MODEL
) -> None:
    """Count one verdict: ``mw_events_consumed_total`` by outcome and ``mw_verdicts_total`` per category."""
    record_verdicts({(decision, tuple(category_codes), cached, model): 1})


def record_blocklist_hits(hits: tuple, *, halted: bool) -> None:
    """Count one verdict with blocklist hits: ``halt`` when a list decided it, else ``annotate``."""
    BLOCKLIST_HITS.labels(action="halt" if halted else "annotate").inc()


def record_verdicts(counts: Mapping[tuple[str, tuple[str, ...], bool, str], int]) -> None:
    """``record_verdict`` for many verdicts at once: ``{(decision, category_codes, cached, model): how many}``.

    For hot loops that tally verdicts locally and add them once per turn (one ``inc(n)`` per label set
    instead of one per verdict); the resulting counter values are the same.
    """
    for (decision, category_codes, cached, model), count in counts.items():
        EVENTS_CONSUMED.labels(outcome="cached" if cached else "verdict").inc(count)
        if decision == "unsafe":
            FLAGGED_EVENTS.inc(count)
        if decision == "unsafe" and category_codes:
            for code in category_codes:
                VERDICTS.labels(model=model, decision="unsafe", category=code).inc(count)
        else:
            VERDICTS.labels(model=model, decision=decision, category=NO_CATEGORY).inc(count)


def record_dead_letter(reason: str) -> None:
    """Count one dead letter: ``mw_events_consumed_total{outcome="dead_letter"}`` and by reason."""
    EVENTS_CONSUMED.labels(outcome="dead_letter").inc()
    DEAD_LETTERS.labels(reason=str(reason)).inc()


def set_partition_lag(topic: str, partition: int, lag: int) -> None:
    """Set ``mw_consumer_lag`` of one assigned partition (lag = high-water mark - next offset, >= 0)."""
    CONSUMER_LAG.labels(topic=topic, partition=str(partition)).set(max(0, lag))


def forget_partition(topic: str, partition: int) -> None:
    """Remove the lag series of a revoked partition so another worker's value is not shadowed."""
    try:
        CONSUMER_LAG.remove(topic, str(partition))
    except KeyError:
        pass  # never had a lag value; nothing to remove


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """A registry in Prometheus text format (what ``/metrics`` serves)."""
    return generate_latest(registry)
