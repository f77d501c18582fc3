"""Image batches prepared in processes beside the worker: decode and the model's processor off the model's GIL.

Preparing an image batch (decode, the image processor's resize/tile/normalize, prompt rendering and
tokenization) is mostly Python; so is a small model's forward pass. On threads of one process the two take
turns on one GIL, each running several times slower beside the other. ``ImagePreparation`` runs
``engine.prepare`` for image batches in ``batching.prepare_processes`` child processes instead
(``concurrent.futures.ProcessPoolExecutor``, ``spawn`` context: never ``fork`` a process that runs torch's
or Ray's threads). Each child loads the checkpoint's processor only (``load_processor``), never the weights,
and builds a preparer from the engine's ``PreparationSpec``, so its tensors are exactly the engine's. Tensors
come back through torch's ``multiprocessing`` reductions (shared memory, not copied through the pipe).

When they start: with ``batching.prepare_processes: N`` the N children start with the worker, before its first
poll. Unset (the default), a worker whose models read images on a host with at least two usable cores gets
one child (``planned_processes``), started in the background on the first image backlog (a full image batch
to prepare) and used once it is up: until then, and for a worker that never sees such a backlog, batches are
prepared on the preparation threads, so a quiet worker or a short test never pays the child's start (torch
and transformers imports, the processor: ≈8 s on two cores). A child that cannot start then is logged and
the threads go on preparing.

Faults: a child that dies (a crash in a native decoder, ``os._exit``) breaks its pool; the pool is replaced
and the batch tried once more on the new one (a batch of a neighbour's crash is innocent). A batch that fails
again, or does not come back within ``batching.prepare_timeout_s`` (a hung child: the pool is killed and
replaced), raises ``EngineError`` of kind ``prepare``: the caller's failure isolation
(``worker.engine.isolation.run_isolated``) then bisects it through this same preparation until the poison
stands alone and becomes a dead letter, while the rest of the batch is answered.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection
from worker.engine.threads import usable_cores
from worker.engine.types import EngineError, ErrorKind

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from worker.config import Settings
    from worker.engine.engine import GuardEngine, PreparationSpec, PreparedBatch
    from worker.engine.registry import ModelRegistry
    from worker.moderation.moderator import Keyed

log = logging.getLogger(__name__)

AUTO_MIN_CORES = 2  # unset prepare_processes: a child only where it gets a core of its own beside the model
PARENT_CHECK_S = 1.0  # a child checks this often whether its worker is still there
WAIT_STEP_S = 0.005  # while waiting on a child, call the caller's ``while_waiting`` this often
STOP_TIMEOUT_S = 10.0  # a child that does not exit this long after close is killed


@dataclass(frozen=True, slots=True)
class ImageItem:
    """What a child needs of one event: its conversation, the id of its policy, its images' bytes."""

    event: ChatEvent
    policy_id: str
    images: tuple[bytes, ...]

    @classmethod
    def of(cls, keyed: Keyed) -> ImageItem:
        return cls(keyed.routed.event, keyed.routed.policy.id, keyed.images)


@dataclass(slots=True)
class ChildPrepared:
    """A child's answer: per item a ``Rejection`` (its images did not decode) or None, and the batch of the
    others (``requests`` left empty: the caller holds them; None when every item was rejected)."""

    rejections: list[Rejection | None]
    batch: PreparedBatch | None


# -- the child ------------------------------------------------------------------------------------------------

_CHILD: dict[str, Any] = {}  # in a child: "preparers" by model name, "limits", "before_item"


def _start_child(
    specs: dict[str, PreparationSpec],
    limits: Any,
    before_item: Callable[[ImageItem], None] | None,
    parent: int,
) -> None:
    """Child initializer: one torch thread (the parent's model has the rest), the processors, no weights."""
    _exit_with_parent(parent)
    import torch

    from worker.engine.engine import GuardEngine
    from worker.engine.loading import load_processor

    torch.set_num_threads(1)
    _CHILD["preparers"] = {
        name: GuardEngine.preparer(spec, load_processor(spec.model)) for name, spec in specs.items()
    }
    _CHILD["limits"] = limits
    _CHILD["before_item"] = before_item


def _exit_with_parent(parent: int) -> None:
    """End this child when its worker is gone. A worker killed outright (SIGKILL, OOM) never shuts its pool
    down, and the child would wait on the pool's queue forever: it holds that queue's write end itself, so
    it never reads end-of-file. Its parent id changes when it is re-parented."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _started() -> bool:
    return bool(_CHILD)


def _prepare_in_child(model: str, items: list[ImageItem]) -> ChildPrepared:
    """Decode every item's images and prepare the batch of those that decoded, as the engine would."""
    from worker.moderation.moderator import decode_event_images
    from worker.moderation.routing import guard_request

    preparer: GuardEngine = _CHILD["preparers"][model]
    before_item = _CHILD["before_item"]
    rejections: list[Rejection | None] = []
    requests = []
    for item in items:
        if before_item is not None:
            before_item(item)
        images = decode_event_images(item.event, item.images, _CHILD["limits"])
        if isinstance(images, Rejection):
            rejections.append(images)
            continue
        rejections.append(None)
        requests.append(guard_request(item.event, preparer.policy_for(item.policy_id), images))
    batch = preparer.prepare(requests) if requests else None
    if batch is not None:
        batch.requests = []  # the parent has them; sending the decoded images back would cost a copy
    return ChildPrepared(rejections, batch)


# -- the parent -----------------------------------------------------------------------------------------------


def _workers(pool: cf.ProcessPoolExecutor) -> list[BaseProcess]:
    # The executor has no public list of its processes before Python 3.14's ``kill_workers``.
    return list((getattr(pool, "_processes", None) or {}).values())


class _Pool:
    """One generation of children: the executor, its start-up tasks, and the batches it holds."""

    def __init__(self, executor: cf.ProcessPoolExecutor, starting: list[cf.Future[bool]]) -> None:
        self.executor = executor
        self.starting = starting
        self.pending: set[cf.Future[ChildPrepared]] = set()  # submitted, not finished successfully


class _BrokenError(Exception):
    """The pool died under a batch; ``shared``: other batches were in it too (the culprit may be theirs)."""

    def __init__(self, shared: bool) -> None:
        super().__init__("the image preparation pool broke")
        self.shared = shared


def planned_processes(settings: Settings, models: ModelRegistry, cores: int | None = None) -> int:
    """How many preparation processes a worker of ``models`` runs: ``batching.prepare_processes`` when set;
    unset, one where a model reads images and the worker has ``AUTO_MIN_CORES`` usable cores, else none."""
    configured = settings.batching.prepare_processes
    if not any(getattr(engine, "supports_images", False) for engine in models.engines.values()):
        return 0
    if configured is not None:
        return configured
    return 1 if (cores if cores is not None else usable_cores()) >= AUTO_MIN_CORES else 0


class ImagePreparation:
    """``prepare(model, items)`` in child processes, restarted when one dies or hangs (see the module docstring).

    ``start``: start the children now (else on ``start()``); ``processes`` defaults to
    ``batching.prepare_processes``. ``before_item`` runs in the child before each item is decoded (a test
    hook: a picklable callable).
    """

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        *,
        processes: int | None = None,
        start: bool = True,
        before_item: Callable[[ImageItem], None] | None = None,
    ) -> None:
        self._processes = processes if processes is not None else (settings.batching.prepare_processes or 0)
        if self._processes < 1:
            raise ValueError("image preparation in processes needs batching.prepare_processes >= 1")
        self.timeout_s = settings.batching.prepare_timeout_s
        self._specs = {
            name: engine.preparation_spec()
            for name, engine in models.engines.items()
            if getattr(engine, "supports_images", False) and hasattr(engine, "preparation_spec")
        }
        self._limits = settings.limits
        self._before_item = before_item
        self._lock = threading.Lock()
        self._closed = False
        self._up = False  # the first children have started: batches go to them from now on
        self._failed = False  # the first children could not start: batches stay on the threads
        self.restarts = 0
        self.prepared_batches = 0  # batches the children prepared (a pool thread counts them)
        self._pool: _Pool | None = self._new_pool() if start else None

    def start(self) -> None:
        """Start the children in the background, if not started yet (any thread; returns at once)."""
        if self._pool is not None or self._closed:
            return
        with self._lock:
            if self._pool is None and not self._closed:
                log.info(
                    "image preparation processes starting",
                    extra={"stage": "prepare", "processes": self._processes},
                )
                self._pool = self._new_pool()

    @property
    def ready(self) -> bool:
        """Whether batches go to the children: the first ones have started (never blocks)."""
        if self._up or self._failed or self._closed:
            return self._up and not self._closed
        pool = self._pool
        if pool is None or not all(started.done() for started in pool.starting):
            return False
        failure = next((s.exception() for s in pool.starting if s.exception() is not None), None)
        if failure is not None:
            self._failed = True
            log.error(
                "image preparation processes could not start (%s: %s); the preparation threads prepare images",
                type(failure).__name__,
                failure,
                extra={"stage": "prepare"},
            )
            with self._lock:
                _stop(pool.executor, kill=True)
            return False
        self._up = True
        log.info(
            "image preparation processes ready", extra={"stage": "prepare", "processes": self._processes}
        )
        return True

    @property
    def ready_processes(self) -> int:
        """How many children batches go to: all of them once the first ones are up, else 0 (never blocks)."""
        return self._processes if self.ready else 0

    def wait_started(self) -> None:
        """Start the children if not started, and block until they are up (processor loaded); raises if one
        could not start."""
        self.start()
        assert self._pool is not None
        for started in self._pool.starting:
            started.result()
        self._up = True

    def handles(self, model: str) -> bool:
        """Whether batches of ``model`` are prepared here (models that read images)."""
        return model in self._specs

    @property
    def pids(self) -> list[int]:
        """The child processes' ids (started ones)."""
        pool = self._pool
        return [p.pid for p in _workers(pool.executor) if p.pid is not None] if pool is not None else []

    def _new_pool(self) -> _Pool:
        executor = cf.ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child,
            initargs=(self._specs, self._limits, self._before_item, os.getpid()),
        )
        # Start the children now (a few seconds each: torch, transformers, the processor), not on the first
        # batch; a batch's timeout counts from when they are up.
        return _Pool(executor, [executor.submit(_started) for _ in range(self._processes)])

    def _replace(self, broken: _Pool, reason: str) -> None:
        """Kill ``broken``'s children and start a new pool (once, whichever thread sees the failure first)."""
        with self._lock:
            if self._pool is not broken or self._closed:
                return
            log.warning(
                "image preparation process failed (%s); restarting it",
                reason,
                extra={"stage": "prepare", "reason": "prepare_process_restart"},
            )
            _stop(broken.executor, kill=True)
            self.restarts += 1
            self._pool = self._new_pool()

    def prepare(
        self,
        model: str,
        items: Sequence[ImageItem],
        *,
        while_waiting: Callable[[], None] | None = None,
    ) -> ChildPrepared:
        """``items`` decoded and prepared in a child; ``EngineError`` (kind ``prepare``) when the child died on
        them or hung (see the module docstring). ``while_waiting`` runs every few ms meanwhile."""
        try:
            return self._attempt(model, list(items), while_waiting)
        except _BrokenError as exc:
            if self._closed:
                raise EngineError("the worker is stopping", kind=ErrorKind.PREPARE) from None
            if not exc.shared:
                raise self._died(len(items)) from None
        try:  # another batch in the same child may have killed it: once more, on the new one
            return self._attempt(model, list(items), while_waiting)
        except _BrokenError:
            raise self._died(len(items)) from None

    @staticmethod
    def _died(size: int) -> EngineError:
        return EngineError(
            f"the image preparation process died on this batch of {size}", kind=ErrorKind.PREPARE
        )

    def _attempt(
        self, model: str, items: list[ImageItem], while_waiting: Callable[[], None] | None
    ) -> ChildPrepared:
        self.start()
        pool = self._pool
        assert pool is not None
        try:
            for started in pool.starting:
                _wait(started, None, while_waiting)
            future = pool.executor.submit(_prepare_in_child, model, items)
        except (BrokenProcessPool, RuntimeError) as exc:  # broke (or shut down) before this batch ran
            self._replace(pool, type(exc).__name__)
            raise _BrokenError(shared=True) from exc
        pool.pending.add(future)
        future.add_done_callback(
            lambda f: pool.pending.discard(f) if not f.cancelled() and f.exception() is None else None
        )
        try:
            result = _wait(future, time.monotonic() + self.timeout_s, while_waiting)
        except BrokenProcessPool as exc:
            shared = len(pool.pending - {future}) > 0
            self._replace(pool, "a child died")
            raise _BrokenError(shared) from exc
        if result is None:
            self._replace(pool, f"no answer within {self.timeout_s:g}s")
            raise EngineError(
                f"image preparation did not finish within batching.prepare_timeout_s={self.timeout_s:g}",
                kind=ErrorKind.PREPARE,
            )
        self.prepared_batches += 1
        return result

    def close(self) -> None:
        """Stop the children (waiting batches are cancelled; a child that does not exit is killed)."""
        with self._lock:
            self._closed = True
            if self._pool is not None:  # children still starting are killed: their start is of no use now
                _stop(self._pool.executor, kill=not self._up)


def _wait(future: cf.Future[Any], deadline: float | None, while_waiting: Callable[[], None] | None) -> Any:
    """``future``'s result, or None past ``deadline`` (None: no deadline); ``while_waiting`` runs meanwhile."""
    while True:
        step = WAIT_STEP_S if while_waiting is not None or deadline is None else deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, step))
        except cf.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if while_waiting is not None:
                while_waiting()


def _stop(pool: cf.ProcessPoolExecutor, *, kill: bool) -> None:
    """Shut ``pool`` down without waiting on a hung child: kill at once (``kill``) or after ``STOP_TIMEOUT_S``."""
    workers = _workers(pool)
    if kill:
        for process in workers:
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_S)


def as_batch(requests: Sequence[Any], prepared: ChildPrepared, mode: str, has_image: bool) -> PreparedBatch:
    """A child's answer as the engine's batch for all of ``requests`` (the parent's, in the child's order):
    items the child rejected become ``prepare`` errors, so the engine answers them as it answers an item it
    cannot prepare."""
    from worker.engine.engine import PreparedBatch

    kept = [i for i, rejection in enumerate(prepared.rejections) if rejection is None]
    batch = prepared.batch if prepared.batch is not None else PreparedBatch([], has_image, mode)
    batch.requests = list(requests)
    batch.rows = [kept[r] for r in batch.rows]
    errors = {kept[i]: error for i, error in batch.errors.items()}
    for i, rejection in enumerate(prepared.rejections):
        if rejection is not None:
            errors[i] = EngineError(f"the image could not be prepared: {rejection.message}", kind="prepare")
    batch.errors = errors
    return batch


__all__ = ["ChildPrepared", "ImageItem", "ImagePreparation", "as_batch", "planned_processes"]
