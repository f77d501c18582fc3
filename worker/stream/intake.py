"""Intake: a poll's records → registered offsets, replays completed, events decoded and routed.

For every record: register its offset with the checkpoint (a re-fetched one is ignored); a replayed record
whose answer the broker already acknowledged (its published marker is in Redis, one MGET per poll) is
completed without output; anything else is decoded (bad input → a ``Rejection``) and routed by the core
(``Moderator.route``: its tenant's policy, the model that judges it). A record another pool's model judges is
completed without output; one no model can judge is a dead letter in exactly one pool
(``ModelRegistry.owns_unrouted``).

With intake processes (``worker.stream.intake_pool``), a poll's records go there as one chunk instead, once
they are started and while they pay. A process publishes the verdicts it can answer on its own producer;
when the chunk returns (a later turn: ``pending`` says one is out), the records whose verdicts the broker
acknowledged are completed here, and the rest take the path above. A revoke or drain first settles the
chunks out, so their answers are completed before the commit that hands the partitions on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import TopicPartition

from worker.cache.published import PublishedMarkers
from worker.config import Settings
from worker.contracts.decode import decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection
from worker.moderation.moderator import Cache, Elsewhere, Moderator, count_verdict
from worker.ops import metrics
from worker.stream.checkpoint import Checkpoint
from worker.stream.intake_pool import (
    CHUNK_TIMEOUT_S,
    LOOP_ACK_TIMEOUT_S,
    STOP_TIMEOUT_S,
    AnswerContext,
    ChunkAnswers,
    IntakePool,
    IntakeProcessError,
    Item,
    PublishedChunk,
    answer_producer,
    publish_chunk,
)
from worker.stream.items import Consumed, RoutedRecord
from worker.stream.records import Encoder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Rejected:
    """A record that becomes a dead letter (with its event when it decoded)."""

    record: Consumed
    rejection: Rejection
    event: ChatEvent | None = None


@dataclass(slots=True)
class Accepted:
    """One turn of intake: events for the lookup, and records for the dead-letter topic."""

    routed: list[RoutedRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class Intake:
    """Registers, deduplicates replays, decodes and routes; ``positions`` is the next offset per partition."""

    def __init__(
        self,
        settings: Settings,
        moderator: Moderator,
        checkpoint: Checkpoint,
        markers: PublishedMarkers,
        counters: Counter[str],
        pool: IntakePool | None = None,
        cache: Cache | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        # The loop thread answers polls the busy processes cannot take as they would (``_answer_here``), with
        # the verdict cache and a producer of its own (made on the first such poll).
        self._cache = cache
        self._here: AnswerContext | None = None
        self._here_producer: cf.Future[Any] | None = None  # made in the background (``_prepare_here``)
        # The last poll answered here, its verdicts sent and their acks not read yet (at most one: the acks of
        # one poll are awaited while the loop takes the next, and read before another poll is sent).
        self._here_chunk: tuple[list[Consumed], PublishedChunk] | None = None
        # Chunks out in intake processes: (their records, the answers' future, when to give up waiting).
        self._chunks: list[tuple[list[Consumed], cf.Future[ChunkAnswers], float]] = []
        self._settled = Accepted()  # what chunks settled by a revoke or drain left to the loop thread's path
        self._moderator = moderator
        self._checkpoint = checkpoint
        self._markers = markers
        self._counters = counters
        self.positions: dict[TopicPartition, int] = {}

    @property
    def pending(self) -> bool:
        """Whether a chunk of records is out in an intake process, or answered here and waiting for its acks."""
        return bool(self._chunks) or self._here_chunk is not None

    def accept(self, records: dict[TopicPartition, list[Any]]) -> Accepted:
        """Take one poll's records (see the module docstring), and the chunks that came back from processes."""
        accepted, self._settled = self._settled, Accepted()
        if self._here_chunk is not None:  # a turn that polled nothing has nothing else to do than wait for it
            self._collect_here(accepted, wait_s=None if records else LOOP_ACK_TIMEOUT_S)
        if records:
            # Timed per poll, not per record: the timer costs as much as decoding.
            with metrics.observe_stage("decode"):
                fresh = self._register(records)
                here = False
                wanted = bool(fresh) and self._pool is not None and self._pool.wants(len(fresh))
                if self._here is None and self._here_producer is None:
                    self._prepare_here()
                if wanted:
                    self._send(fresh)
                elif (
                    fresh and self._cache is not None and self._pool is not None and self._pool.answers_here()
                ):
                    here = True
                else:
                    for consumed in fresh:
                        self._route(consumed, accepted)
            if here:
                self._answer_here(fresh, accepted)
        if self._chunks:
            self._collect(accepted)
        return accepted

    def _register(self, records: dict[TopicPartition, list[Any]]) -> list[Consumed]:
        """Register every polled record; the ones to decode (not re-fetched, not answered before a crash).

        Per partition, not per record: the checkpoint registers a partition's records in one step, and only a
        replayed head (offsets at or below the partition's published high-water mark) is looked up in Redis,
        which is the only place a record's digest is needed before it is answered.
        """
        markers = self._markers
        highs = markers.high_water_marks(list(records)) if markers.enabled else None
        received = time.monotonic()  # one poll: its records were consumed together
        register_many = self._checkpoint.register_many
        fresh: list[Consumed] = []
        consumed = 0
        for tp, batch in records.items():
            offsets = [record.offset for record in batch]
            generation, registered = register_many(tp, offsets)
            if not registered:
                continue  # re-fetched after a seek: already in flight
            if len(registered) < len(batch):
                batch = [batch[i] for i in registered]
                offsets = [offsets[i] for i in registered]
            self.positions[tp] = offsets[-1] + 1
            consumed += len(batch)
            made = [Consumed(tp, r.offset, generation, r.value, r.key, r.timestamp, received) for r in batch]
            if highs is not None and min(offsets) <= highs.get(tp, -1):
                made = self._without_replays(tp, made)
            fresh.extend(made)
        self._counters["consumed"] += consumed
        return fresh

    def _without_replays(self, tp: TopicPartition, made: list[Consumed]) -> list[Consumed]:
        """Complete the records of ``made`` answered and acknowledged by an earlier run; the others."""
        answered = self._markers.acknowledged([(tp, c.offset, c.digest) for c in made])
        fresh = []
        for consumed, done in zip(made, answered, strict=True):
            if done:
                self._complete_without_output(consumed)
                self._counters["replays_skipped"] += 1
                metrics.REPLAYS_SKIPPED.inc()
            else:
                fresh.append(consumed)
        return fresh

    def _send(self, fresh: list[Consumed]) -> None:
        assert self._pool is not None
        self._chunks.append((fresh, self._pool.submit(_items(fresh)), time.monotonic() + CHUNK_TIMEOUT_S))

    def _answer_here(self, fresh: list[Consumed], accepted: Accepted) -> None:
        """The processes are busy: answer this poll's records as a process would, on this thread.

        ``publish_chunk`` with a context of the loop thread's own (this worker's core, cache and markers, and a
        producer of its own) sends the verdicts it can answer; the rest take the staged path now. The broker's
        acks of the sent ones are read on a later turn (``_collect_here``), so the loop takes the next poll
        meanwhile; then their markers are written, on the markers' thread, and the records completed. The acks
        of the poll before are read first: one flush then waits for that poll's verdicts alone. Leaner per
        record than the staged path, which a cache hit does not need.
        """
        if self._here_chunk is not None:
            self._collect_here(accepted, wait_s=LOOP_ACK_TIMEOUT_S)
        try:
            chunk: PublishedChunk | None = publish_chunk(_items(fresh), self._context_here())
        except Exception:  # noqa: BLE001 — a bug here must not stop the stream: the staged path answers them
            self._answering_here_failed()
            chunk = None
        with metrics.observe_stage("decode"):
            answered = chunk.answered if chunk is not None else {}
            for index, consumed in enumerate(fresh):
                if index not in answered:
                    self._route(consumed, accepted)
        if chunk is not None:
            self._here_chunk = (fresh, chunk)

    def _collect_here(self, accepted: Accepted, *, wait_s: float | None) -> None:
        """Complete the poll answered here once the broker answered its verdicts (``wait_s``: wait up to that;
        None: only if they are answered already); a verdict not acknowledged takes the staged path (published
        again: at least once)."""
        assert self._here_chunk is not None
        fresh, chunk = self._here_chunk
        if wait_s is None and not chunk.settled():
            return
        self._here_chunk = None
        try:
            result: ChunkAnswers | None = chunk.finish(wait_s or 0.0)
        except Exception:  # noqa: BLE001 — as in _answer_here
            self._answering_here_failed()
            result = None
        if result is not None:
            self._published(fresh, result, here=True)
        with metrics.observe_stage("decode"):
            published = set(result.published) if result is not None else set()
            for index in chunk.answered:
                if index not in published:
                    self._route(fresh[index], accepted)

    def _answering_here_failed(self) -> None:
        log.exception(
            "answering a poll on the loop thread failed; the staged path answers the busy processes' "
            "overflow from now on",
            extra={"stage": "decode"},
        )
        self._cache = None  # no second try: the staged path is always correct

    def _prepare_here(self) -> None:
        """Once the processes are starting, make the loop thread's answer producer in the background: making it
        waits for the outputs' metadata (measured: the first poll answered here took 120 ms instead of 12 when
        it made the producer itself, just as the processes took over)."""
        if self._cache is None or self._pool is None or not self._pool.pids:
            return
        made: cf.Future[Any] = cf.Future()
        self._here_producer = made
        settings = self._settings

        def make() -> None:
            try:
                made.set_result(answer_producer(settings))
            except BaseException as exc:  # noqa: BLE001 — raised where it is used: the staged path answers
                made.set_exception(exc)

        threading.Thread(target=make, name="intake-answer-producer", daemon=True).start()

    def _context_here(self) -> AnswerContext:
        if self._here is None:
            assert self._cache is not None
            made, self._here_producer = self._here_producer, None
            self._here = AnswerContext(
                self._settings,
                self._moderator,
                self._cache,
                self._markers,
                Encoder(self._settings.topics),
                made.result(timeout=CHUNK_TIMEOUT_S) if made is not None else answer_producer(self._settings),
                marks_async=True,
            )
        return self._here

    def close(self) -> None:
        """Close the loop thread's own answer producer (flushing what it holds), if it was made."""
        if self._here is not None:
            self._here.producer.close(timeout=STOP_TIMEOUT_S)
            self._here = None
        made, self._here_producer = self._here_producer, None
        if made is not None:  # made in the background and never used
            try:
                made.result(timeout=CHUNK_TIMEOUT_S).close(timeout=STOP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 — it was not made: nothing to close
                log.debug("the loop thread's answer producer was not made", exc_info=True)

    def settle(self, timeout_s: float) -> None:
        """Wait for the chunks out (up to ``timeout_s``) and complete what they published.

        A revoke or drain calls this before its commit: a process publishes on its own, so a chunk still out
        when the partitions move would be published by this worker and again by their next owner. What the
        chunks leave to the loop thread's path is taken by the next ``accept``.
        """
        deadline = time.monotonic() + timeout_s
        if self._here_chunk is not None:
            self._collect_here(self._settled, wait_s=max(0.0, min(timeout_s, LOOP_ACK_TIMEOUT_S)))
        if not self._chunks:
            return
        cf.wait([future for _, future, _ in self._chunks], timeout=max(0.0, deadline - time.monotonic()))
        self._collect(self._settled)

    def _collect(self, accepted: Accepted) -> None:
        """The chunks that came back: published records completed, the others down the loop thread's path."""
        assert self._pool is not None
        waiting = []
        for chunk, future, deadline in self._chunks:
            if not future.done() and time.monotonic() < deadline:
                waiting.append((chunk, future, deadline))
                continue
            try:
                if not future.done():
                    raise IntakeProcessError(
                        f"no answer to a chunk of {len(chunk)} records in {CHUNK_TIMEOUT_S:g}s"
                    )
                result = future.result()
            except BaseException as exc:  # noqa: BLE001 — a dead, failed or hung process: redo the chunk here
                self._pool.failed(exc)
                with metrics.observe_stage("decode"):
                    for consumed in chunk:
                        self._route(consumed, accepted)
                continue
            self._published(chunk, result)
            with metrics.observe_stage("decode"):
                published = set(result.published)
                for index, consumed in enumerate(chunk):
                    if index not in published:
                        self._route(consumed, accepted)
        self._chunks = waiting

    def _published(self, chunk: list[Consumed], result: ChunkAnswers, *, here: bool = False) -> None:
        """Complete the records a process (or ``_answer_here``) published (their markers are written), and
        count what it did."""
        assert self._pool is not None
        metrics.STAGE_SECONDS.labels(stage="decode").observe(result.decode_s)
        metrics.STAGE_SECONDS.labels(stage="cache").observe(result.cache_s)
        if result.cache_hits:
            metrics.CACHE_REQUESTS.labels(result="hit").inc(result.cache_hits)
        if result.cache_misses:
            metrics.CACHE_REQUESTS.labels(result="miss").inc(result.cache_misses)
        self._pool.learn(result.cache_hits + result.cache_misses, len(chunk))
        if result.failed_deliveries:
            log.warning(
                "an intake process had %d verdicts unacknowledged; the loop thread publishes them again",
                result.failed_deliveries,
                extra={"stage": "publish"},
            )
        if not result.published:
            return
        metrics.STAGE_SECONDS.labels(stage="publish").observe(result.publish_s)
        counters = self._counters
        if here:
            counters["intake_loop_answers"] += len(result.published)
        else:
            metrics.INTAKE_PROCESS_ANSWERS.inc(len(result.published))
            counters["intake_process_answers"] += len(result.published)
        # Not the ones whose partition left meanwhile (published all the same).
        completed = self._checkpoint.complete_many([chunk[index] for index in result.published])
        counters["completed"] += len(completed)
        # A poll answered here was marked with its high-water marks already (``AnswerContext.marks_async``).
        if not here:
            self._markers.raise_high([(c.tp, c.offset) for c in completed])
        metrics.record_verdicts(result.tally)
        for (_, _, cached, _), count in result.tally.items():
            counters["cached" if cached else "verdicts"] += count
        for hits, halted in result.blocklist_hits:
            count_verdict(hits, halted, False)
        if result.review:
            metrics.REVIEW_BAND.inc(result.review)
        metrics.observe_many(metrics.END_TO_END_SECONDS, result.end_to_end_s)
        metrics.observe_many(metrics.EVENT_LAG_SECONDS, result.event_lag_s)

    def _route(self, consumed: Consumed, accepted: Accepted) -> None:
        decoded = decode_event(consumed.raw, self._settings)  # never raises: bad input is a Rejection
        if isinstance(decoded, Rejection):
            self._unrouted(Rejected(consumed, decoded), accepted)
            return
        routed = self._moderator.route(decoded)
        if isinstance(routed, Rejection):
            self._unrouted(Rejected(consumed, routed, decoded), accepted)
        elif isinstance(routed, Elsewhere):
            self._counters["routed_elsewhere"] += 1
            self._complete_without_output(consumed)
        else:
            accepted.routed.append(RoutedRecord(consumed, routed))

    def _unrouted(self, rejected: Rejected, accepted: Accepted) -> None:
        """No model was chosen: one pool (``worker.moderation.routing``) dead-letters it, the others skip it."""
        if self._moderator.models.owns_unrouted:
            accepted.rejected.append(rejected)
        else:
            self._counters["routed_elsewhere"] += 1
            self._complete_without_output(rejected.record)

    def _complete_without_output(self, consumed: Consumed) -> None:
        if self._checkpoint.complete(consumed):
            self._counters["completed"] += 1

    def forget(self, tp: TopicPartition) -> None:
        """``tp`` left this consumer: its position is unknown until it is consumed again."""
        self.positions.pop(tp, None)
        self._markers.forget(tp)


def _items(records: list[Consumed]) -> list[Item]:
    """``records`` as ``publish_chunk`` takes them (and an intake process receives them)."""
    return [(c.raw, c.received, c.tp.topic, c.tp.partition, c.offset, c.timestamp_ms) for c in records]
