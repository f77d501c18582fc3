"""Classify: misses → micro-batches → preparation on the pool → the model on its own thread → answers.

The steps are the core's (``Moderator.decode_images``, ``ready``, ``classify`` with the one failure-isolation
routine, ``probe``, ``store``); this module decides *when* they run on the stream:

- batching by model and modality, up to ``batching.max_size`` or ``max_wait_ms`` (``MicroBatcher``); an
  event whose content is already being classified joins that entry instead of running twice;
- preparation (image decode, language, ``engine.prepare``: tiling, tokenization) on the thread pool, at most
  ``PREPARE_AHEAD`` batches ahead, so the next batch is ready when the model finishes this one; once the
  preparation processes are up (``batching.prepare_processes``; unset, they are started by the first full
  image batch) an image batch's decode and ``engine.prepare`` run in a preparation process
  (``worker.moderation.image_preparation``) while the pool thread waits, so they never hold the model thread's
  GIL; a batch that fails there is isolated through the same processes (``run_isolated``'s ``prepare``);
- the forward pass on the model thread while the loop thread keeps applying acks (``while_waiting``):
  otherwise the previous batch's acks wait out the whole forward pass, and a crash in that window replays
  answers the broker already has;
- outages (``FailureGuard``): when every item of a batch failed in the model, the probe tells an outage from
  poison. An outage holds the batch (no dead letters); it is retried with backoff until the engine answers,
  and nothing past it is committed meanwhile. A lone poison item is one ``engine_error`` dead letter.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.contracts.rejections import Rejection
from worker.engine.padding import batch_padding
from worker.engine.registry import ModelRegistry
from worker.engine.types import EngineError, GuardRequest, GuardResult
from worker.moderation.batching import Batch, BatchEntry, MicroBatcher, conversation_chars
from worker.moderation.image_preparation import ImageItem, ImagePreparation, as_batch
from worker.moderation.moderator import (
    ENGINE_ERROR_MESSAGE_CHARS,
    Answer,
    Keyed,
    Moderator,
    Ready,
    engine_error_rejection,
)
from worker.ops import metrics
from worker.stream.items import KeyedRecord
from worker.stream.outage import FailureGuard

log = logging.getLogger(__name__)

PREPARE_AHEAD = 2  # prepared batches queued for the model: the one running next and one being prepared
WAIT_STEP_S = 0.005  # while the model runs, apply acks this often

Entry = BatchEntry[KeyedRecord]
Results = list[GuardResult | EngineError]


@dataclass(slots=True)
class PreparedWork:
    """A batch after CPU preparation: what goes to the model, and what was rejected on the way."""

    model: str
    modality: str
    entries: list[Entry] = field(default_factory=list)
    ready: list[Ready] = field(default_factory=list)
    rejected: list[tuple[Entry, Rejection]] = field(default_factory=list)
    prepared: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class Judged:
    """What the model decided this turn: an answer per event, or a rejection (dead letter) per event."""

    answered: list[tuple[KeyedRecord, Answer]] = field(default_factory=list)
    rejected: list[tuple[KeyedRecord, Rejection]] = field(default_factory=list)


def make_batcher(settings: Settings, models: ModelRegistry) -> MicroBatcher[KeyedRecord]:
    """The stream's micro-batcher: by model, modality (mixed only when configured and the engine can) and
    conversation length (``batching.length_lookahead``)."""
    b = settings.batching
    return MicroBatcher(
        b.max_size,
        b.max_wait_ms / 1000.0,
        lookahead=b.length_lookahead,
        length_of=lambda item: conversation_chars(item.event.turns),
        mixes_modalities=lambda model: (
            b.mix_modalities and bool(getattr(models.engine(model), "mixes_modalities", False))
        ),
    )


def _is_fault(result: GuardResult | EngineError) -> bool:
    """Whether ``result`` says the model itself failed on the item (not that its answer did not parse)."""
    return isinstance(result, EngineError) and result.is_fault


class Classify:
    """Batches misses, prepares them on ``pool``, runs the model on ``model_thread``; see the module docstring."""

    def __init__(
        self,
        moderator: Moderator,
        cache: VerdictCache,
        guard: FailureGuard,
        pool: cf.Executor,
        model_thread: cf.Executor,
        counters: Counter[str],
        while_waiting: Callable[[], None],
        preparation: ImagePreparation | None = None,
    ) -> None:
        self._moderator = moderator
        self._preparation = preparation
        self._cache = cache
        self._guard = guard
        self._pool = pool
        self._model_thread = model_thread
        self._counters = counters
        self._while_waiting = while_waiting
        self.batcher = make_batcher(moderator.settings, moderator.models)
        self._prepared: deque[cf.Future[PreparedWork]] = deque()
        self._running: dict[str, Entry] = {}  # cache key → its entry, from batching until its answer
        self._held: PreparedWork | None = None  # the batch waiting out an engine outage

    # -- state the loop reads -------------------------------------------------------------------------

    @property
    def runnable(self) -> bool:
        """A prepared batch waits for the model (and the engine is not down)."""
        return bool(self._prepared) and not self._guard.down("engine")

    @property
    def busy(self) -> bool:
        """Anything batched, being prepared or held."""
        return bool(self._prepared or len(self.batcher) or self._held)

    @property
    def preparing(self) -> bool:
        """Batches are being prepared or wait for the model."""
        return bool(self._prepared)

    # -- the step --------------------------------------------------------------------------------------

    def submit(self, misses: list[KeyedRecord]) -> None:
        """Batch cache misses; one whose content is already being classified shares that answer."""
        for item in misses:
            keyed = item.keyed
            running = self._running.get(keyed.key)
            if running is not None:
                running.items.append(item)
                metrics.DUPLICATES_SKIPPED.inc()
            elif not self.batcher.add(keyed.key, keyed.modality, item, model=keyed.routed.model):
                metrics.DUPLICATES_SKIPPED.inc()

    def run(self, *, flush_all: bool = False) -> Judged:
        """Queue due batches for preparation, then run the model on the oldest prepared one (or the held one)."""
        judged = Judged()
        self._dispatch(flush_all=flush_all)
        if self._held is not None:
            self._retry_held(judged)
            return judged
        if not self._prepared:
            return judged
        head = self._prepared[0]
        if not head.done():
            cf.wait([head], timeout=0.02)  # nothing else to do this turn: wait briefly instead of spinning
            if not head.done():
                return judged
        self._prepared.popleft()
        work = head.result()
        self._dispatch()  # the next batch's preparation overlaps this forward pass
        for entry, rejection in work.rejected:
            self._running.pop(entry.key, None)
            judged.rejected.extend((item, rejection) for item in entry.items)
        if not work.ready:
            return judged
        results = self._classify(work, prepared=work.prepared, prepare_error=work.error)
        if self._engine_down(results, work.model):
            self._hold(work, results)
            return judged
        self._finish(work, results, judged)
        return judged

    def drop(self, stale: Callable[[KeyedRecord], bool]) -> int:
        """Forget batched events of partitions that left; returns how many."""
        return len(self.batcher.drop(stale))

    def forget_held(self, stale: Callable[[KeyedRecord], bool]) -> None:
        """Drop the held batch's events of partitions that left (they are redone by their next owner)."""
        if self._held is not None:
            for entry in self._held.entries:
                entry.items[:] = [item for item in entry.items if not stale(item)]

    # -- preparation (on the pool) ---------------------------------------------------------------------

    def _dispatch(self, *, flush_all: bool = False) -> None:
        if len(self._prepared) >= PREPARE_AHEAD:
            return
        for batch in self.batcher.ready(flush_all=flush_all):
            for entry in batch.entries:
                self._running[entry.key] = entry
            self._prepared.append(self._pool.submit(self._prepare, batch))

    def _prepare(self, batch: Batch[KeyedRecord]) -> PreparedWork:
        """CPU preparation of one batch: decode images, the request and its language, ``engine.prepare``."""
        moderator = self._moderator
        work = PreparedWork(batch.model, batch.modality)
        preparation = self._preparation_for(batch.model, [entry.leader.keyed for entry in batch.entries])
        if preparation is not None:
            with metrics.observe_stage("prepare"):
                self._prepare_in_process(preparation, batch, work)
            return work
        with metrics.observe_stage("prepare"):
            for entry in batch.entries:
                keyed = entry.leader.keyed
                images = moderator.decode_images(keyed) if keyed.images else ()
                if isinstance(images, Rejection):
                    work.rejected.append((entry, images))
                    continue
                work.entries.append(entry)
                work.ready.append(moderator.ready(keyed, images))
            if work.ready:
                try:
                    engine = moderator.models.engine(batch.model)
                    work.prepared = engine.prepare([r.request for r in work.ready])
                except Exception as exc:  # noqa: BLE001 — isolated item by item on the loop thread
                    work.error = exc
        return work

    def _preparation_for(self, model: str, keyed: Sequence[Keyed]) -> ImagePreparation | None:
        """The preparation processes, for a batch of ``keyed`` that has images of a model that reads them, once
        they are up; a full such batch (an image backlog) starts them if they are not started yet."""
        preparation = self._preparation
        if preparation is None or not preparation.handles(model) or not any(k.images for k in keyed):
            return None
        if preparation.ready:
            return preparation
        if len(keyed) >= self._moderator.settings.batching.max_size:
            preparation.start()  # the processes take over once they are up
        return None

    def _prepare_in_process(
        self, preparation: ImagePreparation, batch: Batch[KeyedRecord], work: PreparedWork
    ) -> None:
        """Decode and ``engine.prepare`` in a preparation process; the language here (memoized in this process)."""
        keyed = [entry.leader.keyed for entry in batch.entries]
        try:
            child = preparation.prepare(batch.model, [ImageItem.of(k) for k in keyed])
        except EngineError as exc:  # died or hung on it: isolated item by item on the loop thread
            work.entries = list(batch.entries)
            work.ready = [self._moderator.ready(k) for k in keyed]
            work.error = exc
            return
        for entry, one, rejection in zip(batch.entries, keyed, child.rejections, strict=True):
            if rejection is not None:
                work.rejected.append((entry, rejection))
                continue
            work.entries.append(entry)
            # The request carries no decoded image here: its tensors come from the child, and every
            # re-preparation (isolation, a held batch) goes through ``_prepare_hook`` to the child again.
            work.ready.append(self._moderator.ready(one))
        if child.batch is not None:
            child.batch.requests = [r.request for r in work.ready]
            work.prepared = child.batch

    def _prepare_hook(self, work: PreparedWork) -> Callable[[Sequence[GuardRequest]], Any] | None:
        """How the isolation re-prepares parts of ``work`` (None: ``engine.prepare`` in this process)."""
        preparation = self._preparation_for(work.model, [r.keyed for r in work.ready])
        if preparation is None:
            return None
        source = {id(r.request): r.keyed for r in work.ready}
        mode = getattr(self._moderator.models.engine(work.model), "mode", "single_pass")

        def prepare(requests: Sequence[GuardRequest]) -> Any:
            items = [source[id(r)] for r in requests]
            child = preparation.prepare(
                work.model, [ImageItem.of(k) for k in items], while_waiting=self._while_waiting
            )
            return as_batch(requests, child, mode, has_image=any(k.images for k in items))

        return prepare

    # -- the model --------------------------------------------------------------------------------------

    def _classify(
        self, work: PreparedWork, *, prepared: Any = None, prepare_error: BaseException | None = None
    ) -> Results:
        """The core's classify on the model thread (failures isolated), counting batches and splits."""

        def on_batch(requests: Sequence[GuardRequest]) -> None:
            metrics.BATCH_SIZE.labels(model=work.model, modality=work.modality).observe(len(requests))
            self._counters["batches"] += 1

        def on_split(size: int, error: BaseException) -> None:
            self._counters["isolations"] += 1

        def forward(batch: Any) -> Results:
            metrics.record_padding(work.model, work.modality, *batch_padding(batch))
            return self._forward(batch, model=work.model)

        with metrics.observe_stage("model"):
            return self._moderator.classify(
                work.model,
                work.ready,
                prepared=prepared,
                prepare_error=prepare_error,
                forward=forward,
                prepare=self._prepare_hook(work),
                on_batch=on_batch,
                on_split=on_split,
            )

    def _forward(self, prepared: Any, *, model: str) -> Results:
        """``engine.run`` on the model thread; meanwhile this thread applies the acks that arrive."""
        running = self._model_thread.submit(self._moderator.models.engine(model).run, prepared)
        while True:
            try:
                return running.result(timeout=WAIT_STEP_S)
            except cf.TimeoutError:
                self._while_waiting()

    # -- outages ----------------------------------------------------------------------------------------

    def _engine_down(self, results: Results, model: str) -> bool:
        """Every item failed in the model → probe: a failed probe, or too many such batches in a row, is an outage."""
        if not all(_is_fault(r) for r in results):
            self._guard.batch_succeeded()
            return False
        limit_reached = self._guard.batch_failed()
        return limit_reached or not self._moderator.probe(model)

    def _hold(self, work: PreparedWork, results: Results) -> None:
        """Keep ``work`` out of the dead-letter topic: declare an engine outage and retry it later."""
        self._held = work
        reason = str(results[0])[:ENGINE_ERROR_MESSAGE_CHARS] if results else "the engine failed"
        if self._guard.down("engine"):
            self._guard.retry_failed("engine", reason)
            return
        self._guard.enter("engine", reason)
        self._counters["outages"] += 1
        log.error(
            "engine outage: every item of %d consecutive batch(es) failed; pausing consumption and "
            "retrying with backoff (%s)",
            self._guard.failed_batches,
            reason,
            extra={"stage": "model", "reason": "engine_outage"},
        )

    def _retry_held(self, judged: Judged) -> None:
        """Run the held batch again when its retry is due; its answers count once the engine works."""
        work = self._held
        if work is None or not self._guard.retry_due("engine"):
            return
        # A revoke may have taken some of its events to another worker since (``forget_held``).
        live = [i for i, entry in enumerate(work.entries) if entry.items]
        if not live:
            self._held = None
            self._guard.leave("engine")
            return
        work.entries = [work.entries[i] for i in live]
        work.ready = [work.ready[i] for i in live]
        # Probe first: the held batch then runs only on an engine that works again, so a failure of it
        # after that (with the engine still answering the probe) is its own items' fault, not the outage's.
        if not self._moderator.probe(work.model):
            self._guard.retry_failed("engine", "the probe request still fails")
            return
        results = self._classify(work)  # still isolated: poison stays one dead letter
        # Failed again: still down if the probe fails now, or if the run of failed batches is at the limit
        # (the probe works but batches like this one do not, e.g. only images fail); otherwise its items
        # are poison and become dead letters.
        if all(_is_fault(r) for r in results) and (
            not self._moderator.probe(work.model) or self._guard.batch_failed()
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
        self._finish(work, results, judged)

    # -- answers ----------------------------------------------------------------------------------------

    def _finish(self, work: PreparedWork, results: Results, judged: Judged) -> None:
        """The model's answer for every event of every entry; fresh answers are cached."""
        if len(results) != len(work.entries):
            raise RuntimeError(f"engine returned {len(results)} results for {len(work.entries)} requests")
        fresh = []
        for entry, result in zip(work.entries, results, strict=True):
            self._running.pop(entry.key, None)
            if isinstance(result, EngineError):
                rejection = engine_error_rejection(result)
                judged.rejected.extend((item, rejection) for item in entry.items)
                continue
            fresh.append((entry.leader.keyed, result))
            judged.answered.extend((item, Answer(result, cached=False)) for item in entry.items)
        if fresh:
            with metrics.observe_stage("cache"):
                self._moderator.store(self._cache, fresh)
