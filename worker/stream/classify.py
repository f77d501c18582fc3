"""Classify: misses → micro-batches → preparation on the pool → the model on its own thread → verdicts.

- Batching: by model and modality, up to ``batching.max_size`` or ``max_wait_ms`` (``MicroBatcher``); an
  event whose content is already being classified joins that entry instead of running twice.
- Preparation (image decode, language, ``engine.prepare``: tiling, tokenization) runs on the thread pool,
  at most ``PREPARE_AHEAD`` batches ahead, so the next batch is ready when the model finishes this one.
- The forward pass runs on the model thread while the loop thread keeps applying acks (``while_waiting``):
  otherwise the previous batch's acks wait out the whole forward pass, and a crash in that window replays
  answers the broker already has.
- Failure isolation, one routine (``_isolate``): a batch the engine fails as a whole is split in halves until
  the failing item stands alone (a device out-of-memory turns into smaller batches the same way); that item
  becomes an ``engine_error`` dead letter.
- Outages (``FailureGuard``): when every item of a batch failed in the model, a probe request any working
  engine answers tells an outage from poison. An outage holds the batch (no dead letters), and the held batch
  is retried with backoff until the engine answers; nothing past it is committed meanwhile.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from worker.cache.entries import to_entry
from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.contracts.dead_letters import Reason, RejectedError, Rejection
from worker.contracts.events import Turn
from worker.engine.registry import ModelRegistry
from worker.engine.types import EngineError, GuardRequest, GuardResult
from worker.moderation.batching import Batch, BatchEntry, MicroBatcher
from worker.moderation.language import detect_language
from worker.moderation.routing import guard_request
from worker.ops import metrics
from worker.stream.items import Keyed
from worker.stream.outage import FailureGuard

log = logging.getLogger(__name__)

PREPARE_AHEAD = 2  # prepared batches queued for the model: the one running next and one being prepared
WAIT_STEP_S = 0.005  # while the model runs, apply acks this often
ENGINE_ERROR_MESSAGE_CHARS = 400  # raw model output quoted in an engine_error dead letter, at most
# Engine error kinds that say the model itself failed (not that its answer did not parse).
ENGINE_FAULT_KINDS = frozenset({"model", "out_of_memory", "non_finite"})
# A request every working engine answers: tells an outage from a batch of poison items.
PROBE_TEXT = "Hello! What is the capital of France?"

Entry = BatchEntry[Keyed]
Results = list[GuardResult | EngineError]


@dataclass(slots=True)
class PreparedWork:
    """A batch after CPU preparation: what goes to the model, and what was rejected on the way."""

    model: str
    modality: str
    entries: list[Entry] = field(default_factory=list)
    requests: list[GuardRequest] = field(default_factory=list)
    languages: list[dict[str, Any] | None] = field(default_factory=list)  # of each entry's judged text
    rejected: list[tuple[Entry, Rejection]] = field(default_factory=list)
    prepared: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class Judged:
    """What the model decided this turn: a result per event, or a rejection (dead letter) per event."""

    verdicts: list[tuple[Keyed, GuardResult]] = field(default_factory=list)
    rejected: list[tuple[Keyed, Rejection]] = field(default_factory=list)


class BatchFailedError(Exception):
    """The engine failed a whole batch (every row got the same forward-pass error)."""

    def __init__(self, message: str, *, out_of_memory: bool = False) -> None:
        super().__init__(message)
        self.out_of_memory = out_of_memory


def is_out_of_memory(exc: BaseException) -> bool:
    """A device out-of-memory error (torch.OutOfMemoryError, a RuntimeError saying so, or the engine's report)."""
    if isinstance(exc, BatchFailedError):
        return exc.out_of_memory
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc)
    )


def _kind(result: GuardResult | EngineError) -> str | None:
    if isinstance(result, EngineError) and isinstance(result.detail, dict):
        return result.detail.get("kind")
    return None


def is_engine_fault(result: GuardResult | EngineError) -> bool:
    """Whether ``result`` says the model failed on the item (a raised or non-finite forward pass, not a parse)."""
    return _kind(result) in ENGINE_FAULT_KINDS


def is_batch_failure(result: GuardResult | EngineError) -> bool:
    """Whether ``result`` is the engine's report of a failed forward pass (not a per-item answer problem)."""
    return _kind(result) in ("model", "out_of_memory")


class Classify:
    """Batches misses, prepares them on ``pool``, runs the model on ``model_thread``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        cache: VerdictCache,
        guard: FailureGuard,
        pool: cf.Executor,
        model_thread: cf.Executor,
        counters: Counter[str],
        while_waiting: Callable[[], None],
    ) -> None:
        b = settings.batching
        self._settings = settings
        self._models = models
        self._cache = cache
        self._guard = guard
        self._pool = pool
        self._model_thread = model_thread
        self._counters = counters
        self._while_waiting = while_waiting
        self.batcher: MicroBatcher[Keyed] = MicroBatcher(b.max_size, b.max_wait_ms / 1000.0)
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

    def submit(self, misses: list[Keyed]) -> None:
        """Batch cache misses; one whose content is already being classified shares that answer."""
        for item in misses:
            running = self._running.get(item.cache_key)
            if running is not None:
                running.items.append(item)
                metrics.DUPLICATES_SKIPPED.inc()
            elif not self.batcher.add(item.cache_key, item.modality, item, model=item.routed.model):
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
        if not work.requests:
            return judged
        results = self._run_or_isolate(work)
        if self._engine_down(results, work.model):
            self._hold(work, results)
            return judged
        self._finish(work, results, judged)
        return judged

    def drop(self, stale: Callable[[Keyed], bool]) -> int:
        """Forget batched events of partitions that left; returns how many."""
        return len(self.batcher.drop(stale))

    # -- preparation (on the pool) ---------------------------------------------------------------------

    def _dispatch(self, *, flush_all: bool = False) -> None:
        if len(self._prepared) >= PREPARE_AHEAD:
            return
        for batch in self.batcher.ready(flush_all=flush_all):
            for entry in batch.entries:
                self._running[entry.key] = entry
            self._prepared.append(self._pool.submit(self._prepare, batch))

    def _prepare(self, batch: Batch[Keyed]) -> PreparedWork:
        """CPU preparation of one batch: decode images, detect the language, ``engine.prepare``."""
        from worker.images.load import decode_image

        engine = self._models.engine(batch.model)
        work = PreparedWork(batch.model, batch.modality)
        with metrics.observe_stage("prepare"):
            for entry in batch.entries:
                leader = entry.leader
                try:
                    images = tuple(decode_image(data, self._settings.limits) for data in leader.images)
                except RejectedError as exc:
                    work.rejected.append((entry, exc.rejection))
                    continue
                except Exception as exc:  # noqa: BLE001 — one bad item must not stop the stream
                    reason = f"the image could not be decoded ({type(exc).__name__})."
                    work.rejected.append((entry, Rejection(Reason.IMAGE_UNDECODABLE, reason)))
                    continue
                event = leader.routed.event
                work.entries.append(entry)
                work.languages.append(
                    detect_language(event.turns[-1].texts, self._settings.model.optimized_languages)
                )
                work.requests.append(guard_request(event, leader.routed.policy, images))
            if work.requests:
                try:
                    work.prepared = engine.prepare(work.requests)
                except Exception as exc:  # noqa: BLE001 — isolated item by item on the loop thread
                    work.error = exc
        return work

    # -- the model, failure isolation ------------------------------------------------------------------

    def _run_or_isolate(self, work: PreparedWork) -> Results:
        error = work.error
        if error is None:
            try:
                return self._run_batch(work.requests, work.prepared, work.modality, work.model)
            except Exception as exc:  # noqa: BLE001 — one bad item must not stop the stream
                error = exc
        self._counters["isolations"] += 1
        log.warning(
            "engine failed on a batch of %d (%s%s); splitting it to isolate the cause",
            len(work.requests),
            type(error).__name__,
            ", out of memory" if is_out_of_memory(error) else "",
            extra={"stage": "model"},
        )
        return self._isolate(work.requests, error, work.model)

    def _run_batch(self, requests: list[GuardRequest], prepared: Any, modality: str, model: str) -> Results:
        """``engine.run`` on one prepared batch; raises ``BatchFailedError`` when the batch as a whole failed.

        The engine reports a failed forward pass as the same error on every row (kind ``model`` or
        ``out_of_memory``); with more than one row that says nothing about which item is at fault.
        """
        with metrics.observe_stage("model"):
            results = self._forward(prepared, model)
        metrics.BATCH_SIZE.labels(model=model, modality=modality).observe(len(requests))
        self._counters["batches"] += 1
        if len(requests) > 1:
            failure = next((r for r in results if is_batch_failure(r)), None)
            if failure is not None:
                raise BatchFailedError(str(failure), out_of_memory=_kind(failure) == "out_of_memory")
        return results

    def _forward(self, prepared: Any, model: str) -> Results:
        """``engine.run`` on the model thread; meanwhile this thread applies the acks that arrive."""
        running = self._model_thread.submit(self._models.engine(model).run, prepared)
        while True:
            try:
                return running.result(timeout=WAIT_STEP_S)
            except cf.TimeoutError:
                self._while_waiting()

    def _isolate(self, requests: list[GuardRequest], error: BaseException, model: str) -> Results:
        """Results for ``requests`` after a failed batch: bisect until the failing items stand alone."""
        if len(requests) == 1:
            kind = "out_of_memory" if is_out_of_memory(error) else "model"
            return [
                EngineError(
                    f"the engine failed on this item ({type(error).__name__}: {error})", detail={"kind": kind}
                )
            ]
        engine = self._models.engine(model)
        mid = len(requests) // 2
        results: Results = []
        for half in (requests[:mid], requests[mid:]):
            try:
                modality = "image" if half[0].has_image else "text"
                results.extend(self._run_batch(half, engine.prepare(half), modality, model))
            except Exception as exc:  # noqa: BLE001 — one bad item must not stop the stream
                results.extend(self._isolate(half, exc, model))
        return results

    # -- outages ----------------------------------------------------------------------------------------

    def _engine_down(self, results: Results, model: str) -> bool:
        """Every item failed in the model → probe: a failed probe, or too many such batches in a row, is an outage."""
        if not all(is_engine_fault(r) for r in results):
            self._guard.batch_succeeded()
            return False
        limit_reached = self._guard.batch_failed()
        return limit_reached or not self._probe(model)

    def _probe(self, model: str) -> bool:
        """Run one known-good request on ``model``; True when the engine answers it."""
        engine = self._models.engine(model)
        request = GuardRequest(turns=(Turn("user", (PROBE_TEXT,)),), policy=engine.policy_for(None))
        try:
            (result,) = engine.run(engine.prepare([request]))
        except Exception as exc:  # noqa: BLE001 — a probe that raises is the answer
            log.warning("engine probe raised %s", type(exc).__name__, extra={"stage": "model"})
            return False
        return isinstance(result, GuardResult)

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
        # A revoke may have taken some of its events to another worker since: the stream drops those.
        live = [i for i, entry in enumerate(work.entries) if entry.items]
        if not live:
            self._held = None
            self._guard.leave("engine")
            return
        work.entries = [work.entries[i] for i in live]
        work.requests = [work.requests[i] for i in live]
        work.languages = [work.languages[i] for i in live]
        # Probe first: the held batch then runs only on an engine that works again, so a failure of it
        # after that (with the engine still answering the probe) is its own items' fault, not the outage's.
        if not self._probe(work.model):
            self._guard.retry_failed("engine", "the probe request still fails")
            return
        try:
            engine = self._models.engine(work.model)
            results = self._run_batch(work.requests, engine.prepare(work.requests), work.modality, work.model)
        except Exception as exc:  # noqa: BLE001 — still isolated: poison stays one dead letter
            results = self._isolate(work.requests, exc, work.model)
        # Failed again: still down if the probe fails now, or if the run of failed batches is at the limit
        # (the probe works but batches like this one do not, e.g. only images fail); otherwise its items
        # are poison and become dead letters.
        if all(is_engine_fault(r) for r in results) and (
            not self._probe(work.model) or self._guard.batch_failed()
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

    def forget_held(self, stale: Callable[[Keyed], bool]) -> None:
        """Drop the held batch's events of partitions that left (they are redone by their next owner)."""
        if self._held is not None:
            for entry in self._held.entries:
                entry.items[:] = [item for item in entry.items if not stale(item)]

    # -- answers ----------------------------------------------------------------------------------------

    def _finish(self, work: PreparedWork, results: Results, judged: Judged) -> None:
        """The model's answer for every event of every entry; good answers are cached."""
        if len(results) != len(work.entries):
            raise RuntimeError(f"engine returned {len(results)} results for {len(work.entries)} requests")
        to_cache = []
        for entry, language, result in zip(work.entries, work.languages, results, strict=True):
            self._running.pop(entry.key, None)
            if isinstance(result, EngineError):
                detail = str(result)
                if result.raw_output is not None:
                    detail += f"; raw output: {result.raw_output[:ENGINE_ERROR_MESSAGE_CHARS]!r}"
                rejection = Rejection(Reason.ENGINE_ERROR, detail[: ENGINE_ERROR_MESSAGE_CHARS * 2])
                judged.rejected.extend((item, rejection) for item in entry.items)
                continue
            for code in result.dropped_codes:
                metrics.ENGINE_DROPPED_CODES.labels(code=code).inc()
            result = replace(result, language=language)
            to_cache.append((entry.key, to_entry(result)))
            judged.verdicts.extend((item, result) for item in entry.items)
        if to_cache:
            with metrics.observe_stage("cache"):
                self._cache.set_many(to_cache)
