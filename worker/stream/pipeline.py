"""The stream pipeline: the loop that wires the steps — intake → lookup → classify → outputs → checkpoint.

One ``StreamPipeline`` is one worker (one per GPU). A single loop thread owns the consumer and every step;
a small thread pool fetches image bytes and prepares the next batch while the model runs on its own thread.

| step | module | contract |
| --- | --- | --- |
| intake | ``worker.stream.intake`` | a poll's records → offsets registered, replays completed, events decoded and routed |
| intake processes | ``worker.stream.intake_pool`` | a burst's text cache hits decoded, answered and published off the loop's GIL |
| lookup | ``worker.stream.lookup`` | routed events → image bytes, cache key, one MGET → answered or a miss |
| classify | ``worker.stream.classify`` | misses → batches → prepare → model → verdicts (poison isolated, outages held) |
| outputs | ``worker.stream.outputs`` | verdicts and dead letters published; acks complete offsets; failures re-published |
| checkpoint | ``worker.stream.checkpoint`` | the one commit routine (interval, revoke, drain) over ``OffsetTracker`` |
| partitions | ``worker.stream.partitions`` | rebalance callbacks, backpressure and outage pauses, lag |

The steps run the moderation core (``worker.moderation.moderator.Moderator``: route, images, key, cache answers,
prepare, classify with the one failure-isolation routine, verdict); they decide when it runs on the stream.
Items move through typed stages (``worker.stream.items``): ``Consumed`` → ``RoutedRecord`` → ``KeyedRecord`` →
``Outcome``, each carrying the core's stage beside the record it came from.

Delivery guarantee (at-least-once, one place): an offset is completed only when the broker has acknowledged
its verdict or dead letter; the committed offset per partition is the highest contiguous completed one.
Outputs carry ``event_id`` so downstream deduplicates the replays a crash can cause; replays whose answer was
acknowledged before are completed quietly (published markers in Redis). While an eager rebalance waits for
its new assignment, nothing is published: a revoked partition may move to a member that starts at the
revoke's commit, and an answer published for it in between would only duplicate that member's.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from worker.cache.published import PublishedMarkers
from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.engine.registry import ModelRegistry
from worker.moderation.image_preparation import ImagePreparation, planned_processes
from worker.moderation.moderator import Moderator
from worker.ops import metrics
from worker.stream.checkpoint import Checkpoint
from worker.stream.classify import Classify
from worker.stream.intake import Intake
from worker.stream.intake_pool import IntakePool
from worker.stream.items import KeyedRecord
from worker.stream.lookup import Lookup
from worker.stream.outage import FailureGuard
from worker.stream.outputs import Outputs
from worker.stream.partitions import Partitions
from worker.stream.publisher import Publisher
from worker.stream.status import PipelineStatus

if TYPE_CHECKING:
    from worker.engine.engine import GuardEngine

log = logging.getLogger(__name__)

IDLE_POLL_MS = 100  # poll timeout when nothing is waiting inside the pipeline
# Poll timeout while published outputs await the broker's acks: acks do not wake poll(), and an ack is
# what lets offsets complete and paused partitions resume (≈ linger_ms + one round trip away).
ACK_POLL_MS = 5
REJOIN_POLL_MS = 50  # poll timeout while an eager rebalance waits for the new assignment
CHUNK_POLL_MS = 5  # poll timeout while a chunk is out in an intake process (shorter: measured slower, polls steal the GIL)
COUNTERS = (
    "consumed",
    "verdicts",
    "cached",
    "dead_letters",
    "completed",
    "dropped_revoked",
    "republished",
    "batches",
    "isolations",
    "replays_skipped",
    "outages",
    "routed_elsewhere",  # completed without output: another pool's model judges them
    "intake_process_answers",  # records an intake process answered (mw_intake_process_answers_total)
    "intake_loop_answers",  # records the loop thread answered as a process does, while the processes were busy
)


@dataclass(frozen=True)
class KafkaClients:
    """How a pipeline makes its consumer and producer from the settings (tests inject in-memory ones)."""

    consumer: Callable[[Settings], Any]
    producer: Callable[[Settings], Any]
    # Whether an intake process can make the same producer from the settings alone (real clients can; an
    # in-memory one lives in this process only, so intake stays on the loop thread).
    in_processes: bool = False

    @classmethod
    def real(cls) -> KafkaClients:
        """The configured Kafka client library's consumer and producer (``worker.stream.kafka_clients``)."""
        from worker.stream import kafka_clients

        return cls(kafka_clients.make_consumer, kafka_clients.make_producer, in_processes=True)


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
        clients: KafkaClients | None = None,
        image_preparation: ImagePreparation | None = None,
    ) -> None:
        self.settings = settings
        # The models this worker judges with (a single engine is the one model); ``engine`` is the first.
        self.models: ModelRegistry | None = None
        self.engine: GuardEngine | None = None
        if engine is not None:
            self._use(ModelRegistry.of(engine, settings))
        self.worker_name = worker_name
        self._cache = cache
        self._clients = clients  # None: the real Kafka clients, looked up when the pipeline opens
        # None: started when the pipeline opens if batching.prepare_processes asks for it; closed with it
        self.image_preparation = image_preparation
        self._stop = threading.Event()
        # Guards the one step that makes stopping cost a drain: joining the consumer group (see open()).
        self._joining = threading.Lock()
        self._subscribed = False
        self._running = False
        self._guard = FailureGuard(settings.failures)
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._snapshot = PipelineStatus(worker_name, ready=False, model_loaded=self.engine is not None)

    # ------------------------------------------------------------------ public

    @property
    def ready(self) -> bool:
        """Model loaded, at least one partition assigned, and no dependency outage."""
        return (
            self.engine is not None
            and bool(self._snapshot.assigned)
            and self._running
            and not self._guard.active
        )

    def request_stop(self) -> bool:
        """Ask ``run()`` to stop fetching, drain and return (thread-safe, idempotent).

        Returns whether the pipeline had joined its consumer group. When it had not (it was still
        loading models or connecting), it never will: it holds no partition and no event, so there is
        nothing to drain, and ``run()`` closes what it opened as soon as the current start-up step ends.
        """
        with self._joining:
            self._stop.set()
            return self._subscribed

    def status(self) -> PipelineStatus:
        """A snapshot for health endpoints and the Ray driver (safe to call from any thread)."""
        return dataclasses.replace(
            self._snapshot,
            ready=self.ready,
            model_loaded=self.engine is not None,
            counters=dict(self.counters),
        )

    def run(self) -> None:
        """Consume and moderate until ``request_stop()``; then drain, flush, commit and close."""
        self.open()
        try:
            while not self._stop.is_set():
                self.step()
            if self._subscribed:
                self.drain()
        finally:
            self.close()

    # ------------------------------------------------------------------ the loop

    def step(self, *, draining: bool = False) -> None:
        """One turn: poll → intake → lookup → classify → outputs → acks → checkpoint → pauses."""
        try:
            accepted = self.intake.accept(self._poll(draining))
            if self.checkpoint.tracker.rejoining and not (accepted.routed or accepted.rejected):
                # An eager rebalance is under way (the client's join runs inside poll): the revoked partitions
                # held until the new assignment may move to a member that starts at the revoke's commit, so
                # an answer published for them now would only duplicate its own. Until the assignment says
                # which stay, the turn only applies the broker's acks.
                self.outputs.apply_acks()
                self._report()
                return
            looked_up = self.lookup.lookup(accepted.routed)
            for rejected in accepted.rejected + looked_up.rejected:
                self.outputs.dead_letter(rejected.record, rejected.rejection, rejected.event)
            with metrics.observe_stage("publish"):  # cache hits are answered right here
                for item, answer in looked_up.answered:
                    self.outputs.verdict(item, answer)
            self.classify.submit(looked_up.misses)
            judged = self.classify.run(flush_all=draining)
            for item, rejection in judged.rejected:
                self.outputs.dead_letter(item.record, rejection, item.event)
            with metrics.observe_stage("publish"):
                for item, answer in judged.answered:
                    self.outputs.verdict(item, answer)
            self.outputs.apply_acks()
            self.outputs.republish_due()
            self.checkpoint.commit_if_due()
            if self._guard.active or not draining:  # draining keeps every partition paused
                self.partitions.regulate(hold=self._guard.active)
            self._report()
        finally:
            self.outputs.flush_metrics()

    def drain(self) -> None:
        """Stop fetching, finish in-flight work within the drain deadline, then the checkpoint's commit."""
        deadline = time.monotonic() + self.settings.shutdown.drain_timeout_s
        self.partitions.pause_all()
        # In an outage the held work cannot finish: stop waiting for it (it stays uncommitted, and is redone).
        while self._has_work() and time.monotonic() < deadline and not self._guard.active:
            self.step(draining=True)
            if self.checkpoint.tracker.in_flight() and not (
                self.intake.pending or self.lookup.fetching or self.classify.preparing
            ):
                time.sleep(0.005)  # only acks outstanding: let the producer's I/O thread answer
        self.checkpoint.commit("drain", flush_s=max(0.1, deadline - time.monotonic()))
        self._report()
        left = self.checkpoint.tracker.in_flight()
        if left:
            log.warning(
                "drain deadline reached with %d events unfinished; they will be consumed again",
                left,
                extra={"stage": "stop"},
            )

    def _poll(self, draining: bool) -> dict[TopicPartition, list[Any]]:
        """This turn's records: a poll, or none while the partitions hold back (``Partitions.regulate``)."""
        timeout_ms = self._poll_timeout_ms(draining)
        if self.partitions.holding:
            if timeout_ms:
                time.sleep(timeout_ms / 1000.0)  # what poll would have waited, taking nothing
            return {}
        return self.consumer.poll(timeout_ms=timeout_ms)

    def _poll_timeout_ms(self, draining: bool) -> int:
        if self.checkpoint.tracker.rejoining:  # nothing runs until the assignment: let poll wait for it
            return ACK_POLL_MS if self.outputs.awaiting_acks else REJOIN_POLL_MS
        if draining or self.lookup.fetching or self.classify.runnable:
            return 0
        timeout = ACK_POLL_MS if self.outputs.awaiting_acks else IDLE_POLL_MS
        if self.intake.pending:  # a chunk's answers do not wake poll() either
            timeout = min(timeout, CHUNK_POLL_MS)
        for wait_s in (
            self.classify.batcher.seconds_until_due(),
            self._guard.seconds_until_retry(),
            self.outputs.seconds_until_republish(),
            self.checkpoint.seconds_until_due(),
        ):
            if wait_s is not None:
                timeout = min(timeout, int(wait_s * 1000))
        return timeout

    def _has_work(self) -> bool:
        return (
            self.intake.pending
            or self.lookup.fetching
            or self.classify.busy
            or self.checkpoint.tracker.in_flight() > 0
        )

    def _report(self) -> None:
        """Refresh what ``status()`` reports and the gauges; only the loop thread reads the live structures."""
        tracker = self.checkpoint.tracker
        self._snapshot = PipelineStatus(
            self.worker_name,
            ready=False,  # computed when asked
            model_loaded=self.engine is not None,
            assigned=tuple(sorted(f"{tp.topic}-{tp.partition}" for tp in self.partitions.assigned)),
            # Partitions held back (none taken, none paused: see ``Partitions.regulate``) count as paused.
            paused=len(self.partitions.assigned) if self.partitions.holding else len(self.partitions.paused),
            in_flight=tracker.in_flight(),
            all_committed=tracker.all_committed(),
            outage=self._guard.status(),
            intake_processes=self._intake_pool.ready_processes,
            preparation_processes=(
                self.image_preparation.ready_processes if self.image_preparation is not None else 0
            ),
        )
        metrics.IN_FLIGHT_EVENTS.set(self._snapshot.in_flight)
        metrics.INTAKE_PROCESSES.set(self._snapshot.intake_processes)
        metrics.PREPARATION_PROCESSES.set(self._snapshot.preparation_processes)
        metrics.WORKER_READY.set(1 if self.ready else 0)
        self.partitions.update_lag(self.intake.positions)

    # ------------------------------------------------------------------ rebalance (forwarded by _Rebalance)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.partitions.on_partitions_revoked(revoked)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.partitions.on_partitions_assigned(assigned)

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        self.partitions.on_partitions_lost(lost)

    def _forget(self, gone: set[TopicPartition]) -> int:
        """Partitions that left: forget their positions and their waiting work; returns the events dropped."""
        for tp in gone:
            self.intake.forget(tp)

        def stale(item: KeyedRecord) -> bool:
            return self.checkpoint.is_stale(item.record)

        self.classify.forget_held(stale)
        dropped = self.classify.drop(stale)
        self.counters["dropped_revoked"] += dropped
        return dropped

    # ------------------------------------------------------------------ lifecycle

    def _use(self, models: ModelRegistry) -> None:
        self.models, self.engine = models, models.first
        self.moderator = Moderator(models, self.settings)
        metrics.register_models(models.names)

    def load_models(self) -> ModelRegistry:
        """Load every model this worker holds, once (``open`` calls it; a runner may call it earlier)."""
        models = self.models
        if models is None:
            models = ModelRegistry.from_settings(self.settings)
            self._use(models)
        return models

    def open(self) -> None:
        """Load the models (unless given), connect the cache and the Kafka clients, build the steps, subscribe."""
        models = self.load_models()
        metrics.MODEL_LOAD_SECONDS.set(models.load_seconds)
        from worker.moderation.language import warm_up
        from worker.ops.heap import settle_after_load

        warm_up()  # the detector's model loads once per process: not on the first batch's clock
        settle_after_load()  # the models' objects leave garbage collection: no half-second pauses in the loop
        if self._cache is None:
            self._cache = VerdictCache(self.settings.redis)
        cache = self._cache
        markers = self._markers = PublishedMarkers(cache, self.settings)
        clients = self._clients if self._clients is not None else KafkaClients.real()
        self._producer = clients.producer(self.settings)
        self.consumer = clients.consumer(self.settings)
        self._pool = cf.ThreadPoolExecutor(
            self.settings.batching.prepare_threads, thread_name_prefix=f"{self.worker_name}-prep"
        )
        self._model_thread = cf.ThreadPoolExecutor(1, thread_name_prefix=f"{self.worker_name}-model")
        configured = self.settings.batching.prepare_processes is not None
        if self.image_preparation is None and (processes := planned_processes(self.settings, models)):
            # Unset: started on the first image backlog (see the module of ImagePreparation).
            self.image_preparation = ImagePreparation(
                self.settings, models, processes=processes, start=configured
            )
        if self.image_preparation is not None and configured:
            # Up before the first poll, as the models are: the first image batch must not wait on a start.
            self.image_preparation.wait_started()
        self.checkpoint = Checkpoint(self.consumer, settle=self._settle)
        publisher = Publisher(self._producer, self.settings.topics)
        moderator = self.moderator
        self.outputs = Outputs(
            self.settings, moderator, publisher, markers, self.checkpoint, self._guard, self.counters
        )
        # No cache, no hits; and a process publishes on a producer of its own, made from the settings.
        processes = self.settings.batching.intake_processes if cache.enabled and clients.in_processes else 0
        self._intake_pool = IntakePool(self.settings, models, processes)
        self.intake = Intake(
            self.settings, moderator, self.checkpoint, markers, self.counters, self._intake_pool, cache
        )
        self.lookup = Lookup(moderator, cache, self._pool.submit)
        self.classify = Classify(
            moderator,
            cache,
            self._guard,
            self._pool,
            self._model_thread,
            self.counters,
            while_waiting=self._apply_acks_if_awaited,
            preparation=self.image_preparation,
        )
        self.partitions = Partitions(self.consumer, self.checkpoint, self.settings.batching, self._forget)
        self._running = True
        threading.Thread(
            target=self._learn_output_partitions,
            name=f"{self.worker_name}-metadata",
            daemon=True,  # never holds up shutdown: at worst it waits out max_block_ms on a closed producer
        ).start()
        with self._joining:  # a stop requested while starting keeps the worker out of the group
            if self._stop.is_set():
                log.info(
                    "stop requested before joining the consumer group: nothing to drain",
                    extra={"stage": "start", "worker": self.worker_name},
                )
                return
            self.consumer.subscribe([self.settings.topics.events], listener=_Rebalance(self))
            self._subscribed = True
        log.info("pipeline started", extra={"stage": "start", "worker": self.worker_name})

    def _settle(self, timeout_s: float) -> None:
        """Before a revoke's or drain's commit: the chunks out in intake processes, then the outputs' acks."""
        deadline = time.monotonic() + timeout_s
        self.intake.settle(timeout_s)
        self.outputs.settle(max(0.0, deadline - time.monotonic()))

    def _apply_acks_if_awaited(self) -> None:
        if self.outputs.awaiting_acks:
            self.outputs.apply_acks()

    def close(self) -> None:
        """Stop the pools, close the clients and the cache (after ``drain``, or after a failure)."""
        self._running = False
        metrics.WORKER_READY.set(0)
        for cause in list(self._guard.outages):  # this worker no longer reports; its outage ends with it
            self._guard.leave(cause)
        if self.image_preparation is not None:  # first: a pool thread may be waiting on a child
            self.image_preparation.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._model_thread.shutdown(wait=True, cancel_futures=True)
        self._intake_pool.close()
        self.intake.close()
        try:
            self.consumer.close(autocommit=False)
        finally:
            self._producer.close(timeout=5)
            self._markers.close()
            if self._cache is not None:
                self._cache.close()
        log.info("pipeline stopped", extra={"stage": "stop", "worker": self.worker_name, **self.counters})

    def _learn_output_partitions(self) -> None:
        """Fetch the output topics' metadata while the consumer joins its group.

        Otherwise the first ``send`` to each output topic blocks the loop on a metadata round trip (≈100 ms
        per topic on tansu, which backs metadata refreshes off by ``retry_backoff_ms``). ``send`` stays
        correct either way: it waits for whatever this has not fetched yet.
        """
        from worker.stream.publisher import output_topics

        for topic in output_topics(self.settings.topics):
            try:
                self._producer.partitions_for(topic)
            except Exception as exc:  # noqa: BLE001 — only a head start: the sends report real failures
                log.debug("no metadata for %s yet: %s", topic, type(exc).__name__, extra={"stage": "publish"})
                return
