"""Running a batch so that one bad item, or a batch too large for the device, fails only itself.

The engine reports a forward pass that failed as a whole (it raised, or the device ran out of memory) as
the same error on every row: with more than one row that says nothing about which item is at fault. So
``run_isolated`` splits such a batch in halves, and each failing half again, until the failing items stand
alone — which is also how an out-of-memory batch becomes smaller batches that fit. Items that fail alone get
an ``EngineError`` of kind ``model`` or ``out_of_memory``; every other item gets its answer.

The one failure-isolation routine of the project: ``GuardEngine.classify`` (HTTP, evaluation) and the
stream's classify step both run batches through it. Plain Python over the engine's ``prepare``/``run``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worker.engine.types import BATCH_FAILURE_KINDS, EngineError, ErrorKind, GuardRequest, GuardResult

if TYPE_CHECKING:
    from worker.engine.engine import GuardEngine

log = logging.getLogger(__name__)

Results = list[GuardResult | EngineError]


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


def run_isolated(
    engine: GuardEngine,
    requests: Sequence[GuardRequest],
    *,
    prepared: Any = None,
    prepare_error: BaseException | None = None,
    forward: Callable[[Any], Results] | None = None,
    prepare: Callable[[Sequence[GuardRequest]], Any] | None = None,
    on_batch: Callable[[Sequence[GuardRequest]], None] | None = None,
    on_split: Callable[[int, BaseException], None] | None = None,
) -> Results:
    """One result per request, in order; a batch that fails as a whole is bisected (see the module docstring).

    ``prepared``: ``engine.prepare(requests)`` done ahead (the stream prepares on another thread), or
    ``prepare_error`` when that raised. ``forward``: how to run a prepared batch (default ``engine.run``; the
    stream runs it on its model thread). ``prepare``: how to prepare a batch the bisection re-prepares (default
    ``engine.prepare``; the stream may prepare image batches in a preparation process). An ``EngineError`` of
    kind ``prepare`` raised for a whole batch ends, for the item that alone still fails, as that error's kind.
    ``on_batch(requests)`` is called for every forward pass run;
    ``on_split(size, error)`` once when the batch as given had to be split.
    """
    requests = list(requests)
    run = forward if forward is not None else engine.run
    prep = prepare if prepare is not None else engine.prepare
    try:
        if prepare_error is not None:
            raise prepare_error
        return _run_whole(requests, prepared, prep, run, on_batch)
    except Exception as error:  # noqa: BLE001 — isolated item by item below
        log.warning(
            "engine failed on a batch of %d (%s%s); splitting it to isolate the cause",
            len(requests),
            type(error).__name__,
            ", out of memory" if is_out_of_memory(error) else "",
            extra={"stage": "model"},
        )
        if on_split is not None:
            on_split(len(requests), error)
        return _bisect(engine, requests, error, prep, run, on_batch)


def classify_in_batches(
    engine: GuardEngine,
    requests: Sequence[GuardRequest],
    *,
    forward: Callable[[Any], Results] | None = None,
    prepare: Callable[[Sequence[GuardRequest]], Any] | None = None,
    on_batch: Callable[[Sequence[GuardRequest]], None] | None = None,
    on_split: Callable[[int, BaseException], None] | None = None,
) -> Results:
    """Any list of requests: split into ``engine.batches`` (modality, size), each run by ``run_isolated``;
    one result per request, in input order."""
    by_index: dict[int, GuardResult | EngineError] = {}
    for chunk in engine.batches(list(requests)):
        answers = run_isolated(
            engine,
            [requests[i] for i in chunk],
            forward=forward,
            prepare=prepare,
            on_batch=on_batch,
            on_split=on_split,
        )
        by_index.update(zip(chunk, answers, strict=True))
    return [by_index[i] for i in range(len(requests))]


def _run_whole(
    requests: list[GuardRequest],
    prepared: Any,
    prepare: Callable[[Sequence[GuardRequest]], Any],
    run: Callable[[Any], Results],
    on_batch: Callable[[Sequence[GuardRequest]], None] | None,
) -> Results:
    """``run`` on the batch; raises ``BatchFailedError`` when a batch of several rows failed as a whole."""
    if prepared is None:
        prepared = prepare(requests)
    results = run(prepared)
    if on_batch is not None:
        on_batch(requests)
    if len(requests) > 1:
        failure = next(
            (r for r in results if isinstance(r, EngineError) and r.kind in BATCH_FAILURE_KINDS), None
        )
        if failure is not None:
            raise BatchFailedError(str(failure), out_of_memory=failure.kind is ErrorKind.OUT_OF_MEMORY)
    return results


def _bisect(
    engine: GuardEngine,
    requests: list[GuardRequest],
    error: BaseException,
    prepare: Callable[[Sequence[GuardRequest]], Any],
    run: Callable[[Any], Results],
    on_batch: Callable[[Sequence[GuardRequest]], None] | None,
) -> Results:
    if len(requests) == 1:
        kind = ErrorKind.OUT_OF_MEMORY if is_out_of_memory(error) else ErrorKind.MODEL
        if isinstance(error, EngineError) and error.kind is ErrorKind.PREPARE:
            kind = ErrorKind.PREPARE
        return [EngineError(f"the engine failed on this item ({type(error).__name__}: {error})", kind=kind)]
    empty_device_cache(engine)
    mid = len(requests) // 2
    results: Results = []
    for half in (requests[:mid], requests[mid:]):
        try:
            results.extend(_run_whole(half, None, prepare, run, on_batch))
        except Exception as exc:  # noqa: BLE001 — one bad item must not fail the others
            results.extend(_bisect(engine, half, exc, prepare, run, on_batch))
    return results


def empty_device_cache(engine: GuardEngine) -> None:
    """Give cached CUDA memory back before retrying smaller batches (a no-op off CUDA)."""
    device = getattr(engine, "device", None)
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
