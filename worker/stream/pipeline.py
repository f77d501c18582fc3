"""The stream pipeline: Kafka → decode → cache → micro-batch → prepare → engine → publish → commit.

One ``StreamPipeline`` is one worker (one per GPU). A single loop thread owns the consumer, the offset
tracker, the batcher and the engine's forward pass; a small thread pool does the CPU work that can
overlap the model — image fetching (``image_bytes``) and batch preparation (``decode_image`` +
``engine.prepare``: tiling, tokenization) of the *next* batch while the current one runs.

Delivery guarantee (at-least-once, one place): an offset is completed only when the broker has
acknowledged its verdict or dead letter (``Publisher.drain_acks``); the committed offset per partition
is the highest contiguous completed one (``OffsetTracker``). Outputs carry ``event_id`` so downstream
deduplicates the replays a crash can cause.

Replays stay quiet: once every output of a record is acknowledged, a published marker for its source
offset goes to Redis (``PublishedMarkers``); a record consumed again after a crash whose marker is found
is completed without publishing its answer twice.

Failure handling: bad input → dead letter with its reason; a batch whose engine call raises is split
in halves until the failing item(s) are isolated (``engine_error``) — which is also how a device
out-of-memory turns into smaller batches; Redis down → uncached (see ``VerdictCache``). When the engine
fails every item of a batch and a probe request fails too (or such batches keep coming), or deliveries
keep failing, that is an outage, not poison (``FailureGuard``): the batch is held, the partitions paused,
readiness turns false and the held work is retried with backoff until it succeeds.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.cache.published import PublishedMarkers, record_digest
from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.contracts.dead_letters import SourceCoordinates, build_dead_letter
from worker.contracts.decode import decode_event, salvage_event_id
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection
from worker.contracts.verdicts import event_lag_seconds
from worker.engine.padding import batch_padding
from worker.engine.registry import ModelRegistry
from worker.engine.types import EngineError, GuardResult
from worker.moderation.batching import Batch, BatchEntry, MicroBatcher, conversation_chars
from worker.moderation.moderator import (
    ENGINE_ERROR_MESSAGE_CHARS,
    Answer,
    Elsewhere,
    Keyed,
    Moderator,
    Ready,
    Routed,
    engine_error_rejection,
)
from worker.ops import metrics
from worker.stream.offsets import OffsetTracker
from worker.stream.outage import FailureGuard
from worker.stream.publisher import Publisher

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

    from worker.engine.engine import GuardEngine

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2  # commit completed offsets at most this often (and always at revoke/shutdown)
LAG_INTERVAL_S = 1.0  # refresh the per-partition lag gauge this often
IDLE_POLL_MS = 100  # poll timeout when nothing is waiting inside the pipeline
# Poll timeout while published outputs await the broker's acks: acks do not wake poll(), and an ack is
# what lets offsets complete and paused partitions resume (≈ linger_ms + one round trip away).
ACK_POLL_MS = 5
PREPARE_AHEAD = 2  # prepared batches queued for the model: the one running next and one being prepared


@dataclass(eq=False, slots=True)
class WorkItem:
    """One consumed record on its way to a verdict or a dead letter (identity = the record)."""

    tp: TopicPartition
    offset: int
    generation: int  # tracking generation of ``tp`` when consumed; stale once the partition left
    raw: bytes | None
    record_key: bytes | None
    timestamp_ms: int
    received: float  # time.monotonic() when consumed
    event: ChatEvent | None = None  # once decoded
    routed: Routed | None = None  # once its policy and model are chosen
    keyed: Keyed | None = None  # once its image bytes and cache key are known
    output: tuple[str, dict[str, Any]] | None = None  # what was published, kept to re-publish on failure
    digest: bytes = b""  # record_digest(raw), what its published marker stores
    failed_deliveries: int = 0

    @property
    def source(self) -> SourceCoordinates:
        return SourceCoordinates(self.tp.topic, self.tp.partition, self.offset)

    @property
    def event_id(self) -> str | None:
        return self.event.event_id if self.event is not None else None


@dataclass(slots=True)
class PreparedWork:
    """A batch after CPU preparation: what goes to the model, and what was rejected on the way."""

    model: str
    modality: str
    entries: list[BatchEntry[WorkItem]]
    ready: list[Ready]
    prepared: Any = None
    error: BaseException | None = None
    rejected: list[tuple[BatchEntry[WorkItem], Rejection]] = field(default_factory=list)


def _is_fault(result: GuardResult | EngineError) -> bool:
    """Whether ``result`` says the model itself failed on the item (not that its answer did not parse)."""
    return isinstance(result, EngineError) and result.is_fault


class _Rebalance(ConsumerRebalanceListener):
    """Forwards kafka-python's rebalance callbacks (run inside ``poll``, on the loop thread)."""

    def __init__(self, pipeline: StreamPipeline) -> None:
        self._pipeline = pipeline

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._pipeline._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._pipeline._on_assigned(set(assigned))

    def on_partitions_lost(self, lost: Any) -> None:
        self._pipeline._on_lost(set(lost))


class StreamPipeline:
    """One moderation worker on the configured topics: ``run()`` until ``request_stop()``, then drain."""

    def __init__(
        self,
        settings: Settings,
        engine: GuardEngine | ModelRegistry | None = None,
        *,
        worker_name: str = "worker",
        cache: VerdictCache | None = None,
    ) -> None:
        self.settings = settings
        # The models this worker judges with (a single engine is the one model); ``engine`` is the first.
        self.models: ModelRegistry | None = ModelRegistry.of(engine, settings) if engine is not None else None
        self.engine = self.models.first if self.models is not None else None
        self.moderator: Moderator | None = None
        if self.models is not None:
            metrics.register_models(self.models.names)
            self.moderator = Moderator(self.models, settings)
        self.worker_name = worker_name
        self._cache = cache
        self._stop = threading.Event()
        self._running = False
        b = settings.batching
        self._max_in_flight = b.max_in_flight
        self._resume_below = b.resume_below if b.resume_below is not None else b.max_in_flight // 2
        self._tracker = OffsetTracker()
        self._batcher: MicroBatcher[WorkItem] = MicroBatcher(
            b.max_size,
            b.max_wait_ms / 1000.0,
            lookahead=b.length_lookahead,
            length_of=lambda item: conversation_chars(item.event.turns if item.event is not None else ()),
            mixes_modalities=lambda model: (
                b.mix_modalities
                and self.models is not None
                and bool(getattr(self.models.engine(model), "mixes_modalities", False))
            ),
        )
        self._next_fetch: dict[TopicPartition, int] = {}
        self._fetching: list[tuple[WorkItem, cf.Future[bytes]]] = []
        self._key_ready: list[WorkItem] = []
        self._prepared: deque[cf.Future[PreparedWork]] = deque()
        self._running_entries: dict[str, BatchEntry[WorkItem]] = {}
        self._paused: set[TopicPartition] = set()
        self._assigned: set[TopicPartition] = set()
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._snapshot: dict[str, Any] = {
            "assigned": [],
            "paused": 0,
            "in_flight": 0,
            "all_committed": True,
            "outage": None,
        }
        self._consumer: KafkaConsumer | None = None
        self._publisher: Publisher | None = None
        self._markers: PublishedMarkers | None = None
        self._guard = FailureGuard(settings.failures)
        self._held: PreparedWork | None = None  # the batch waiting out an engine outage
        self._republish: list[tuple[float, WorkItem]] = []  # (monotonic due time, item) of failed deliveries
        # Verdicts counted this loop turn, added to the Prometheus counters once per turn (``_flush_metrics``):
        # one ``inc(n)`` per label set instead of several label lookups per event on the hot path.
        self._verdict_tally: Counter[tuple[str, tuple[str, ...], bool, str]] = Counter()
        self.counters: dict[str, int] = {
            "consumed": 0,
            "verdicts": 0,
            "cached": 0,
            "dead_letters": 0,
            "completed": 0,
            "dropped_revoked": 0,
            "republished": 0,
            "batches": 0,
            "isolations": 0,
            "replays_skipped": 0,
            "outages": 0,
            "routed_elsewhere": 0,  # completed without output: another pool's model judges them
        }

    # ------------------------------------------------------------------ public

    @property
    def ready(self) -> bool:
        """Model loaded, at least one partition assigned, and no dependency outage."""
        return (
            self.engine is not None
            and bool(self._snapshot["assigned"])
            and self._running
            and not self._guard.active
        )

    def request_stop(self) -> None:
        """Ask ``run()`` to stop fetching, drain and return (thread-safe, idempotent)."""
        self._stop.set()

    def status(self) -> dict[str, Any]:
        """A snapshot for health endpoints and the Ray driver (safe to call from any thread).

        ``all_committed``: nothing in flight and every completed offset committed (as of the last loop turn).
        """
        status = {
            "worker": self.worker_name,
            "ready": self.ready,
            "model_loaded": self.engine is not None,
            **self._snapshot,
            "counters": dict(self.counters),
        }
        if status["outage"]:
            status["reason"] = "+".join(f"{cause}_outage" for cause in status["outage"])
        return status

    def _take_snapshot(self) -> None:
        """Refresh what ``status()`` reports; only the loop thread touches the live structures."""
        self._snapshot = {
            "assigned": sorted(f"{tp.topic}-{tp.partition}" for tp in self._assigned),
            "paused": len(self._paused),
            "in_flight": self._tracker.in_flight(),
            "all_committed": self._tracker.all_committed(),
            "outage": self._guard.status(),
        }

    def load_models(self) -> ModelRegistry:
        """Load every model this worker holds, once (``run`` calls it; a runner may call it earlier)."""
        if self.models is None:
            self.models = ModelRegistry.from_settings(self.settings)
            self.engine = self.models.first
            metrics.register_models(self.models.names)
            self.moderator = Moderator(self.models, self.settings)
        return self.models

    def run(self) -> None:
        """Consume and moderate until ``request_stop()``; then drain, flush, commit and close."""
        from worker.stream.kafka_clients import make_consumer, make_producer

        models = self.load_models()
        metrics.MODEL_LOAD_SECONDS.set(models.load_seconds)
        from worker.moderation.language import warm_up

        warm_up()  # the detector's model loads once per process: not on the first batch's clock
        if self._cache is None:
            self._cache = VerdictCache(self.settings.redis)
        self._markers = PublishedMarkers(self._cache, self.settings)
        producer: KafkaProducer = make_producer(self.settings)
        consumer: KafkaConsumer = make_consumer(self.settings)
        self._consumer, self._publisher = consumer, Publisher(producer, self.settings.topics)
        pool = cf.ThreadPoolExecutor(
            self.settings.batching.prepare_threads, thread_name_prefix=f"{self.worker_name}-prep"
        )
        self._pool = pool
        # The forward pass runs here while the loop thread keeps applying acks (and writing published
        # markers) — otherwise the acks of the previous batch wait out the whole forward pass, and a crash
        # in that window replays answers the broker already has.
        self._model_thread = cf.ThreadPoolExecutor(1, thread_name_prefix=f"{self.worker_name}-model")
        self._running = True
        threading.Thread(
            target=self._learn_output_partitions,
            args=(producer,),
            name=f"{self.worker_name}-metadata",
            daemon=True,  # never holds up shutdown: at worst it waits out max_block_ms on a closed producer
        ).start()
        try:
            consumer.subscribe([self.settings.topics.events], listener=_Rebalance(self))
            log.info("pipeline started", extra={"stage": "start", "worker": self.worker_name})
            while not self._stop.is_set():
                self._step(draining=False)
            self._drain()
        finally:
            self._running = False
            metrics.WORKER_READY.set(0)
            for cause in list(self._guard.outages):  # this worker no longer reports; its outage ends with it
                self._guard.leave(cause)
            pool.shutdown(wait=True, cancel_futures=True)
            self._model_thread.shutdown(wait=True, cancel_futures=True)
            try:
                consumer.close(autocommit=False)
            finally:
                producer.close(timeout=5)
                self._cache.close()
            log.info("pipeline stopped", extra={"stage": "stop", "worker": self.worker_name, **self.counters})

    def _learn_output_partitions(self, producer: KafkaProducer) -> None:
        """Fetch the output topics' metadata while the consumer joins its group.

        Otherwise the first ``send`` to each output topic blocks the loop on a metadata round trip
        (≈100 ms per topic on tansu, which backs metadata refreshes off by ``retry_backoff_ms``).
        ``send`` stays correct either way: it waits for whatever this has not fetched yet.
        """
        from worker.stream.publisher import output_topics

        for topic in output_topics(self.settings.topics):
            try:
                producer.partitions_for(topic)
            except Exception as exc:  # noqa: BLE001 — only a head start: the sends report real failures
                log.debug("no metadata for %s yet: %s", topic, type(exc).__name__, extra={"stage": "publish"})
                return

    # ------------------------------------------------------------------ loop

    def _step(self, *, draining: bool) -> None:
        """One turn of the loop: poll, decode, look up, batch, prepare, run, publish, complete, commit."""
        try:
            self._turn(draining=draining)
        finally:
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Add the verdicts tallied this turn to the Prometheus counters."""
        if self._verdict_tally:
            metrics.record_verdicts(self._verdict_tally)
            self._verdict_tally.clear()

    def _turn(self, *, draining: bool) -> None:
        assert self._consumer is not None
        records = self._consumer.poll(timeout_ms=self._poll_timeout_ms(draining))
        if records:
            with metrics.observe_stage(
                "decode"
            ):  # per poll, not per record: the timer costs as much as decoding
                self._accept_all(records)
        self._collect_fetched_images()
        self._lookup_cache()
        self._dispatch_ready_batches(flush_all=draining)
        self._run_next_prepared()
        self._apply_acks()
        self._republish_due()
        self._maybe_commit()
        if self._guard.active:
            self._hold_consumption()
        elif not draining:  # draining keeps every partition paused: no resume, whatever the in-flight count
            self._apply_backpressure()
        self._update_gauges()

    def _poll_timeout_ms(self, draining: bool) -> int:
        # In an engine outage the prepared batches wait for the held one: they are no reason to spin.
        runnable = self._prepared and not self._guard.down("engine")
        if draining or self._key_ready or runnable or self._fetching:
            return 0
        timeout = IDLE_POLL_MS
        if self._publisher is not None and self._publisher.awaiting_acks:
            timeout = ACK_POLL_MS
        due = self._batcher.seconds_until_due()
        for wait_s in (due, self._guard.seconds_until_retry(), self._seconds_until_republish()):
            if wait_s is not None:
                timeout = min(timeout, int(wait_s * 1000))
        return timeout

    def _has_work(self) -> bool:
        return bool(
            self._fetching or self._key_ready or self._prepared or len(self._batcher) or self._held
        ) or (self._tracker.in_flight() > 0)

    def _drain(self) -> None:
        """Stop fetching, finish in-flight work within the drain deadline, flush, commit."""
        assert self._consumer is not None and self._publisher is not None
        deadline = time.monotonic() + self.settings.shutdown.drain_timeout_s
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(*assignment)
        # In an outage the held work cannot finish: stop waiting for it (it stays uncommitted, and is redone).
        while self._has_work() and time.monotonic() < deadline and not self._guard.active:
            self._step(draining=True)
            if self._tracker.in_flight() and not (self._fetching or self._key_ready or self._prepared):
                time.sleep(0.005)  # only acks outstanding: let the producer's I/O thread answer
        self._publisher.flush(max(0.1, deadline - time.monotonic()))
        self._apply_acks()
        self._maybe_commit(force=True)
        self._take_snapshot()
        left = self._tracker.in_flight()
        if left:
            log.warning(
                "drain deadline reached with %d events unfinished; they will be consumed again",
                left,
                extra={"stage": "stop"},
            )

    # ------------------------------------------------------------------ stages

    def _accept_all(self, records: dict[TopicPartition, list[Any]]) -> None:
        """Accept one poll's records; the replayed ones whose answer is already acknowledged are completed."""
        assert self._markers is not None
        if not self._markers.enabled:
            for tp, batch in records.items():
                for record in batch:
                    self._accept(tp, record, b"")
            return
        polled = [
            (tp, record, record_digest(record.value)) for tp, batch in records.items() for record in batch
        ]
        answered = self._markers.acknowledged([(tp, record.offset, digest) for tp, record, digest in polled])
        for (tp, record, digest), done in zip(polled, answered, strict=True):
            if not done:
                self._accept(tp, record, digest)
            elif self._tracker.register(tp, record.offset):
                self._next_fetch[tp] = record.offset + 1
                self.counters["consumed"] += 1
                generation = self._tracker.generation(tp)
                assert generation is not None  # register() tracks the partition
                self._tracker.complete(tp, record.offset, generation)
                self.counters["completed"] += 1  # its answer was acknowledged, by an earlier run
                self.counters["replays_skipped"] += 1
                metrics.REPLAYS_SKIPPED.inc()

    def _accept(self, tp: TopicPartition, record: Any, digest: bytes) -> None:
        """Register a consumed record and decode it into an event (or a dead letter)."""
        if not self._tracker.register(tp, record.offset):
            return  # re-fetched after a seek: already in flight
        self._next_fetch[tp] = record.offset + 1
        self.counters["consumed"] += 1
        generation = self._tracker.generation(tp)
        assert generation is not None  # register() tracks the partition
        item = WorkItem(
            tp=tp,
            offset=record.offset,
            generation=generation,
            raw=record.value,
            record_key=record.key,
            timestamp_ms=record.timestamp,
            received=time.monotonic(),
            digest=digest,
        )
        decoded = decode_event(record.value, self.settings)  # never raises: bad input is a Rejection
        if isinstance(decoded, Rejection):
            self._reject_unrouted(item, decoded)
            return
        item.event = decoded
        assert self.moderator is not None
        routed = self.moderator.route(decoded)
        if isinstance(routed, Rejection):
            self._reject_unrouted(item, routed)
        elif isinstance(routed, Elsewhere):
            self._complete_without_output(item)
        elif decoded.image is not None:
            item.routed = routed
            self._fetching.append((item, self._pool.submit(self.moderator.load_images, routed)))
        else:
            item.routed = routed
            item.keyed = self.moderator.key(routed)
            self._key_ready.append(item)

    def _reject_unrouted(self, item: WorkItem, rejection: Rejection) -> None:
        """A record no model was chosen for: one pool (``worker.moderation.routing``) dead-letters it, the others skip it."""
        assert self.models is not None
        if self.models.owns_unrouted:
            self._dead_letter(item, rejection)
        else:
            self._complete_without_output(item)

    def _complete_without_output(self, item: WorkItem) -> None:
        """Another pool answers this record: complete its offset now, publish nothing."""
        self.counters["routed_elsewhere"] += 1
        if self._tracker.complete(item.tp, item.offset, item.generation):
            self.counters["completed"] += 1

    def _collect_fetched_images(self) -> None:
        """Move items whose image bytes arrived on to the cache lookup (or to the DLQ)."""
        if not self._fetching:
            return
        waiting = []
        for item, future in self._fetching:
            if not future.done():
                waiting.append((item, future))
                continue
            keyed = future.result()  # never raises: a failed fetch is a Rejection
            if isinstance(keyed, Rejection):
                self._dead_letter(item, keyed)
                continue
            item.keyed = keyed
            self._key_ready.append(item)
        self._fetching = waiting

    def _lookup_cache(self) -> None:
        """One cache read for every item that got its key this turn; hits are answered, misses batched."""
        if not self._key_ready:
            return
        items, self._key_ready = self._key_ready, []
        assert self._cache is not None and self.moderator is not None
        with metrics.observe_stage("cache"):
            answers = self.moderator.answers(self._cache, [i.keyed for i in items])  # type: ignore[misc]
        with metrics.observe_stage("publish"):  # hits are answered right here
            for item, answer in zip(items, answers, strict=True):
                if answer is not None:
                    self._emit_verdict(item, answer)
                else:
                    self._batch(item)

    def _batch(self, item: WorkItem) -> None:
        """A miss joins the item classifying the same content, or the micro-batcher."""
        keyed = item.keyed
        assert keyed is not None
        running = self._running_entries.get(keyed.key)
        if running is not None:  # the same content is already being classified: share its answer
            running.items.append(item)
            metrics.DUPLICATES_SKIPPED.inc()
        elif not self._batcher.add(keyed.key, keyed.modality, item, model=keyed.routed.model):
            metrics.DUPLICATES_SKIPPED.inc()

    def _dispatch_ready_batches(self, *, flush_all: bool = False) -> None:
        """Hand due batches to the thread pool for preparation, keeping at most PREPARE_AHEAD queued."""
        if len(self._prepared) >= PREPARE_AHEAD:
            return
        for batch in self._batcher.ready(flush_all=flush_all):
            for entry in batch.entries:
                self._running_entries[entry.key] = entry
            self._prepared.append(self._pool.submit(self._prepare, batch))

    def _prepare(self, batch: Batch[WorkItem]) -> PreparedWork:
        """CPU preparation of one batch (runs in the pool): decode images, the request, then ``engine.prepare``."""
        assert self.models is not None and self.moderator is not None
        work = PreparedWork(batch.model, batch.modality, [], [])
        with metrics.observe_stage("prepare"):
            for entry in batch.entries:
                keyed = entry.leader.keyed
                assert keyed is not None
                images = self.moderator.decode_images(keyed) if keyed.images else ()
                if isinstance(images, Rejection):
                    work.rejected.append((entry, images))
                    continue
                work.entries.append(entry)
                work.ready.append(self.moderator.ready(keyed, images))
            if work.ready:
                try:
                    work.prepared = self.models.engine(batch.model).prepare([r.request for r in work.ready])
                except Exception as exc:  # noqa: BLE001 — isolated item by item on the loop thread
                    work.error = exc
        return work

    def _run_next_prepared(self) -> None:
        """Run the model on the oldest prepared batch, once its preparation is done (or retry a held one)."""
        if self._held is not None:
            self._retry_held()
            return
        if not self._prepared:
            return
        head = self._prepared[0]
        if not head.done():
            # Nothing else to do this turn: wait briefly instead of spinning on poll(0).
            cf.wait([head], timeout=0.02)
            if not head.done():
                return
        self._prepared.popleft()
        work = head.result()
        # Queue the next batch's preparation first, so it overlaps this forward pass.
        self._dispatch_ready_batches()
        for entry, rejection in work.rejected:
            self._running_entries.pop(entry.key, None)
            for item in entry.items:
                self._dead_letter(item, rejection)
        work.rejected = []
        if not work.ready:
            return
        results = self._classify(work, prepared=work.prepared, prepare_error=work.error)
        if self._engine_down(results, work.model):
            self._hold(work, results)
            return
        self._finish(work.entries, results)

    def _classify(
        self, work: PreparedWork, *, prepared: Any = None, prepare_error: BaseException | None = None
    ) -> list[GuardResult | EngineError]:
        """The moderator's classify on the model thread (failures isolated), counting batches and splits."""
        assert self.moderator is not None

        def on_batch(requests: Any) -> None:
            metrics.BATCH_SIZE.labels(model=work.model, modality=work.modality).observe(len(requests))
            self.counters["batches"] += 1

        def on_split(size: int, error: BaseException) -> None:
            self.counters["isolations"] += 1

        def forward(batch: Any) -> list[GuardResult | EngineError]:
            metrics.record_padding(work.model, work.modality, *batch_padding(batch))
            return self._forward(batch, model=work.model)

        with metrics.observe_stage("model"):
            return self.moderator.classify(
                work.model,
                work.ready,
                prepared=prepared,
                prepare_error=prepare_error,
                forward=forward,
                on_batch=on_batch,
                on_split=on_split,
            )

    def _engine_down(self, results: list[GuardResult | EngineError], model: str) -> bool:
        """Whether a batch's results mean an engine outage rather than poison items.

        Every item failed in the model → probe the engine with a request any working model answers: a
        failed probe, or ``failures.max_failed_batches`` such batches in a row, is an outage.
        """
        if not all(_is_fault(r) for r in results):
            self._guard.batch_succeeded()
            return False
        limit_reached = self._guard.batch_failed()
        return limit_reached or not self._probe_engine(model)

    def _probe_engine(self, model: str) -> bool:
        """Run one known-good request on ``model``; True when the engine answers it."""
        assert self.moderator is not None
        return self.moderator.probe(model)

    def _hold(self, work: PreparedWork, results: list[GuardResult | EngineError]) -> None:
        """Keep ``work`` out of the dead-letter topic: declare an engine outage and retry it later."""
        self._held = work
        reason = str(results[0])[:ENGINE_ERROR_MESSAGE_CHARS] if results else "the engine failed"
        if not self._guard.down("engine"):
            self._guard.enter("engine", reason)
            self.counters["outages"] += 1
            log.error(
                "engine outage: every item of %d consecutive batch(es) failed; pausing consumption and "
                "retrying with backoff (%s)",
                self._guard.failed_batches,
                reason,
                extra={"stage": "model", "reason": "engine_outage"},
            )
        else:
            self._guard.retry_failed("engine", reason)

    def _retry_held(self) -> None:
        """Run the held batch again when its retry is due; publish its answers once the engine works."""
        work = self._held
        assert work is not None and self.models is not None
        if not self._guard.retry_due("engine"):
            return
        # A revoke may have taken some of its events to another worker since: do not judge those.
        live = [
            (entry, ready)
            for entry, ready in zip(work.entries, work.ready, strict=True)
            if not all(self._stale(item) for item in entry.items)
        ]
        if not live:
            self._held = None
            self._guard.leave("engine")
            return
        work.entries, work.ready = [e for e, _ in live], [r for _, r in live]
        # Probe first: the held batch then runs only on an engine that works again, so a failure of it
        # after that (with the engine still answering the probe) is its own items' fault, not the outage's.
        if not self._probe_engine(work.model):
            self._guard.retry_failed("engine", "the probe request still fails")
            return
        results = self._classify(work)  # still isolated: poison stays one dead letter
        # Failed again: still down if the probe fails now, or if the run of failed batches is at the limit
        # (the probe works but batches like this one do not, e.g. only images fail); otherwise its items
        # are poison and become dead letters.
        if all(_is_fault(r) for r in results) and (
            not self._probe_engine(work.model) or self._guard.batch_failed()
        ):
            self._hold(work, results)
            return
        outage = self._guard.leave("engine")
        self._held = None
        log.warning(
            "engine recovered after %d failed retries; resuming",
            outage.attempts if outage is not None else 0,
            extra={"stage": "model", "reason": "engine_recovered"},
        )
        self._finish(work.entries, results)

    def _forward(self, prepared: Any, *, model: str) -> list[GuardResult | EngineError]:
        """``engine.run`` on the model thread; meanwhile this thread applies the acks that arrive."""
        assert self.models is not None
        running = self._model_thread.submit(self.models.engine(model).run, prepared)
        while True:
            try:
                return running.result(timeout=ACK_POLL_MS / 1000)
            except cf.TimeoutError:
                if self._publisher is not None and self._publisher.awaiting_acks:
                    self._apply_acks()

    def _finish(self, entries: list[BatchEntry[WorkItem]], results: list[GuardResult | EngineError]) -> None:
        """Publish a batch's answers (every item sharing an entry gets its answer) and cache the fresh ones."""
        assert self.moderator is not None and self._cache is not None
        fresh = []
        for entry, result in zip(entries, results, strict=True):
            self._running_entries.pop(entry.key, None)
            if isinstance(result, EngineError):
                rejection = engine_error_rejection(result)
                for item in entry.items:
                    self._dead_letter(item, rejection)
                continue
            fresh.append((entry.leader.keyed, result))
            with metrics.observe_stage("publish"):
                for item in entry.items:
                    self._emit_verdict(item, Answer(result, cached=False))
        if fresh:
            with metrics.observe_stage("cache"):
                self.moderator.store(self._cache, fresh)

    # ------------------------------------------------------------------ outputs

    def _stale(self, item: WorkItem) -> bool:
        """Whether ``item``'s partition left this consumer since it was consumed (its next owner redoes it).

        A partition kept across a rebalance keeps its generation: its in-flight items are not stale.
        """
        return self._tracker.generation(item.tp) != item.generation

    def _emit_verdict(self, item: WorkItem, answer: Answer) -> None:
        if self._stale(item):
            self.counters["dropped_revoked"] += 1
            return
        assert item.keyed is not None and self.moderator is not None
        verdict = self.moderator.verdict(
            item.keyed, answer, latency_ms=(time.monotonic() - item.received) * 1000.0, source=item.source
        )
        self._verdict_tally[
            (
                verdict["decision"],
                tuple(c["code"] for c in verdict["categories"]),
                answer.cached,
                item.keyed.routed.model,
            )
        ] += 1
        self.counters["cached" if answer.cached else "verdicts"] += 1
        item.output = ("verdict", verdict)
        self._publish(item)

    def _dead_letter(self, item: WorkItem, rejection: Rejection) -> None:
        if self._stale(item):
            self.counters["dropped_revoked"] += 1
            return
        dead_letter = build_dead_letter(
            rejection,
            item.raw,
            item.source,
            max_original_bytes=self.settings.limits.dead_letter_original_max_bytes,
            event_id=item.event_id or salvage_event_id(item.raw),
            key=item.record_key,
        )
        log.info(
            "dead letter: %s",
            rejection.reason.value,
            extra={
                "event_id": dead_letter.get("event_id"),  # salvaged from the raw record when decoding failed
                "stage": "dead_letter",
                "reason": rejection.reason.value,
                "topic": item.source.topic,
                "partition": item.source.partition,
                "offset": item.source.offset,
                "field": rejection.field,
            },
        )
        metrics.record_dead_letter(rejection.reason.value)
        self.counters["dead_letters"] += 1
        item.output = ("dead_letter", dead_letter)
        self._publish(item)

    def _publish(self, item: WorkItem) -> None:
        assert self._publisher is not None and item.output is not None
        kind, record = item.output
        if kind == "verdict":
            self._publisher.publish_verdict(record, item)
        else:
            self._publisher.publish_dead_letter(record, item.record_key, item)

    def _apply_acks(self) -> None:
        """Mark acknowledged events completed (and their markers written); schedule failed ones again."""
        assert self._publisher is not None and self._markers is not None
        now = time.time()
        acked = []
        for item, error in self._publisher.drain_acks():
            if self._stale(item):
                continue
            if error is not None:
                self._delivery_failed(item, error)
                continue
            if item.failed_deliveries and self._guard.down("delivery"):
                self._guard.leave("delivery")
                log.warning("deliveries work again; resuming", extra={"stage": "publish"})
            if self._tracker.complete(item.tp, item.offset, item.generation):
                self.counters["completed"] += 1
                acked.append((item.tp, item.offset, item.digest))
                if item.timestamp_ms and item.timestamp_ms > 0:
                    metrics.END_TO_END_SECONDS.observe(max(0.0, now - item.timestamp_ms / 1000.0))
                if item.event is not None and item.event.created_at is not None:
                    lag = event_lag_seconds(item.event.created_at, now)
                    if lag is not None:
                        metrics.EVENT_LAG_SECONDS.observe(lag)
        if acked and self._markers.enabled:
            with metrics.observe_stage("cache"):
                self._markers.mark(acked)

    def _delivery_failed(self, item: WorkItem, error: BaseException) -> None:
        """Schedule ``item`` to be published again after a backoff; too many failures are a delivery outage."""
        item.failed_deliveries += 1
        self.counters["republished"] += 1
        reason = f"{type(error).__name__}: {error}"[:ENGINE_ERROR_MESSAGE_CHARS]
        if item.failed_deliveries >= self.settings.failures.max_publish_attempts:
            if not self._guard.down("delivery"):
                self._guard.enter("delivery", reason)
                self.counters["outages"] += 1
                log.error(
                    "delivery outage: an event failed %d deliveries (%s); pausing consumption, retrying with "
                    "backoff",
                    item.failed_deliveries,
                    type(error).__name__,
                    extra={"event_id": item.event_id, "stage": "publish", "reason": "delivery_outage"},
                )
            else:
                self._guard.retry_failed("delivery", reason)
        else:
            log.warning(
                "delivery failed (%s); publishing again after a backoff",
                type(error).__name__,
                extra={"event_id": item.event_id, "stage": "publish"},
            )
        due = time.monotonic() + self._guard.delay(item.failed_deliveries)
        self._republish.append((due, item))

    def _seconds_until_republish(self) -> float | None:
        if not self._republish:
            return None
        return max(0.0, min(due for due, _ in self._republish) - time.monotonic())

    def _republish_due(self) -> None:
        """Publish again the failed deliveries whose backoff has passed (never dropped, except when revoked)."""
        if not self._republish:
            return
        now = time.monotonic()
        waiting = []
        for due, item in self._republish:
            if self._stale(item):
                continue
            if due > now:
                waiting.append((due, item))
            else:
                self._publish(item)
        self._republish = waiting

    def _hold_consumption(self) -> None:
        """In an outage: keep every assigned partition paused (also ones assigned since it began)."""
        assert self._consumer is not None
        assignment = set(self._consumer.assignment())
        # The same bookkeeping as ``_apply_backpressure``, which does not run meanwhile.
        self._forget(self._tracker.retain(assignment))
        self._paused &= assignment
        unpaused = assignment - self._paused
        if unpaused:
            self._consumer.pause(*unpaused)
            self._paused |= unpaused
        metrics.PAUSED_PARTITIONS.set(len(self._paused))

    # ------------------------------------------------------------------ offsets, backpressure, rebalance

    def _maybe_commit(self, *, force: bool = False) -> None:
        """Commit the completed offsets (synchronously) at most every COMMIT_INTERVAL_S."""
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        offsets = self._tracker.committable()
        if not offsets:
            return
        assert self._consumer is not None
        try:
            with metrics.observe_stage("commit"):
                self._consumer.commit(offsets)
        except KafkaError as exc:  # e.g. a rebalance is under way: the next owner replays at most these
            log.warning("commit failed: %s", type(exc).__name__, extra={"stage": "commit"})
            return
        self._tracker.mark_committed(offsets)

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition above the in-flight bound; resume once below the low mark.

        ``_paused`` is what this pipeline paused and the client still holds paused: kafka-python keeps
        the paused flag of a partition kept across a rebalance and clears it for one that left, so
        ``_forget`` removes partitions that left, and partitions assigned while paused are paused too.
        """
        assert self._consumer is not None
        assignment = set(self._consumer.assignment())
        self._forget(self._tracker.retain(assignment))
        self._paused &= assignment
        in_flight = self._tracker.in_flight()
        if in_flight > self._max_in_flight or (self._paused and in_flight > self._resume_below):
            newly = assignment - self._paused
            if newly:
                self._consumer.pause(*newly)
                if not self._paused:
                    log.info(
                        "paused %d partitions (%d in flight)",
                        len(newly),
                        in_flight,
                        extra={"stage": "backpressure"},
                    )
                self._paused |= newly
        elif self._paused:
            self._consumer.resume(*self._paused)
            self._paused = set()
        metrics.PAUSED_PARTITIONS.set(len(self._paused))

    def _update_gauges(self) -> None:
        self._take_snapshot()
        metrics.IN_FLIGHT_EVENTS.set(self._snapshot["in_flight"])
        metrics.WORKER_READY.set(1 if self.ready else 0)
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = now
        assert self._consumer is not None
        for tp in self._assigned:
            # The high-water mark comes with fetch responses; tansu answers LATEST lookups wrongly.
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._next_fetch.get(tp)
            if position is None:
                continue  # nothing consumed yet since the assignment: position unknown without a round trip
            metrics.set_partition_lag(tp.topic, tp.partition, highwater - position)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is complete; forget the partitions the client already dropped, hold the others.

        Eager protocol: every partition is revoked before the rejoin while the client still holds them;
        the ones it keeps keep their fetch position, so their in-flight work must stay (see
        ``worker.stream.offsets``). Cooperative: only partitions that left are revoked, already dropped.
        """
        if self._publisher is not None:
            # Published-but-unacked outputs would otherwise be replayed by the next owner: wait for their acks.
            try:
                self._publisher.flush(5.0)
            except KafkaError as exc:
                log.warning("flush on revoke failed: %s", type(exc).__name__, extra={"stage": "publish"})
            self._apply_acks()
        offsets = self._tracker.committable(revoked)
        if offsets and self._consumer is not None:
            # Async: a blocking commit raises in kafka-python 3's listener. Not marked committed: a kept
            # partition's next periodic commit repeats it, so a lost async commit leaves no false record.
            try:
                self._consumer.commit_async(offsets)
            except KafkaError as exc:
                log.warning("commit on revoke failed: %s", type(exc).__name__, extra={"stage": "commit"})
        client_assignment = self._consumer.assignment() if self._consumer is not None else set()
        dropped = self._forget(self._tracker.revoke(revoked, client_assignment))
        if revoked:
            log.info(
                "partitions revoked: %d (%d left, dropped %d waiting events)",
                len(revoked),
                len(dropped[0]),
                dropped[1],
                extra={"stage": "rebalance"},
            )

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        """The group evicted this member: forget everything at once (commits would be refused)."""
        dropped = self._forget(self._tracker.lose(lost))
        if lost:
            log.warning(
                "partitions lost: %d (dropped %d waiting events)",
                len(lost),
                dropped[1],
                extra={"stage": "rebalance"},
            )

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Track new partitions (they start at the committed offset); keep the ones kept across the rebalance."""
        dropped = self._forget(self._tracker.assign(assigned))
        self._assigned |= assigned
        log.info(
            "partitions assigned: %s (%d left)",
            sorted(tp.partition for tp in assigned),
            len(dropped[0]),
            extra={"stage": "rebalance"},
        )

    def _forget(self, gone: set[TopicPartition]) -> tuple[set[TopicPartition], int]:
        """Drop local state of partitions that left the client's assignment; returns them and the waiting events dropped."""
        if not gone:
            return gone, 0
        for tp in gone:
            self._next_fetch.pop(tp, None)
            metrics.forget_partition(tp.topic, tp.partition)
        self._assigned -= gone
        self._paused -= gone
        # Items of a partition that left are stale; ones consumed since it came back are not.
        waiting = self._batcher.drop(self._stale)
        self.counters["dropped_revoked"] += len(waiting)
        return gone, len(waiting)
