"""When a failing dependency must stop the stream instead of being judged away (arroyo's ``DlqLimit`` idea).

Two dependencies can fail for every event at once: the engine (corrupt weights, a driver fault, a lost
device) and the broker's acceptance of outputs. Bisection turns a failing *item* into one dead letter, and
a failed delivery is re-published — but applied to an outage, the first dead-letters every event and
commits it ("handled"), and the second spins without end. ``FailureGuard`` is the bookkeeping that tells
the pipeline when a failure is an outage, and when to try again:

- engine: a batch on which every item failed in the model is a *failed batch*; the pipeline then probes
  the engine with a known-good request. A failed probe, or ``failures.max_failed_batches`` failed batches
  in a row, is an engine outage. A probe that succeeds below the limit means the items are poison.
- delivery: an event whose outputs failed ``failures.max_publish_attempts`` times is a delivery outage.

During an outage the pipeline pauses its partitions, reports not ready (``status()["outage"]``), sets
``mw_outage{cause}`` to 1 and retries with exponential backoff (tenacity's ``wait_exponential_jitter``,
``failures.retry_initial_s`` … ``failures.retry_max_s``). Nothing held is committed or dropped.

Pure bookkeeping with metrics: no Kafka or engine calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, wait_exponential_jitter

from worker.config import FailureSettings
from worker.ops import metrics


@dataclass(slots=True)
class Outage:
    """One dependency that is down: since when, why, and when the next retry is due."""

    cause: str  # one of metrics.OUTAGE_CAUSES
    reason: str  # the last error, one line
    since: float  # time.time() when declared
    attempts: int = 0  # failed retries so far
    retry_at: float = 0.0  # clock() of the next retry


class FailureGuard:
    """Counts consecutive failed batches, holds the outage state per cause, and spaces retries."""

    def __init__(self, settings: FailureSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._wait = wait_exponential_jitter(
            multiplier=settings.retry_initial_s, max=settings.retry_max_s, jitter=settings.retry_initial_s / 2
        )
        self.failed_batches = 0  # consecutive batches on which every item failed in the engine
        self.outages: dict[str, Outage] = {}

    @property
    def active(self) -> bool:
        """Whether any dependency is down (the stream must stay paused)."""
        return bool(self.outages)

    def down(self, cause: str) -> bool:
        """Whether ``cause`` is down."""
        return cause in self.outages

    def batch_succeeded(self) -> None:
        """A batch got at least one answer from the model: the failed-batch run is over."""
        self.failed_batches = 0

    def batch_failed(self) -> bool:
        """Count a failed batch; returns whether the run of failed batches reached the limit."""
        self.failed_batches += 1
        return self.failed_batches >= self.settings.max_failed_batches

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): exponential with jitter, capped."""
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # only attempt_number is read
        state.attempt_number = attempt
        return float(self._wait(state))

    def enter(self, cause: str, reason: str) -> Outage:
        """Declare ``cause`` down (idempotent) and schedule its first retry."""
        outage = self.outages.get(cause)
        if outage is not None:
            return outage
        outage = Outage(cause, reason, time.time())
        outage.retry_at = self._clock() + self.delay(1)
        self.outages[cause] = outage
        metrics.OUTAGE.labels(cause=cause).set(1)
        metrics.OUTAGES.labels(cause=cause).inc()
        return outage

    def retry_due(self, cause: str) -> bool:
        """Whether ``cause`` is down and its next retry is due."""
        outage = self.outages.get(cause)
        return outage is not None and self._clock() >= outage.retry_at

    def seconds_until_retry(self) -> float | None:
        """Seconds until the earliest retry of any outage (None when nothing is down)."""
        if not self.outages:
            return None
        return max(0.0, min(o.retry_at for o in self.outages.values()) - self._clock())

    def retry_failed(self, cause: str, reason: str) -> None:
        """A retry of ``cause`` failed again: wait longer before the next."""
        outage = self.outages[cause]
        outage.attempts += 1
        outage.reason = reason
        outage.retry_at = self._clock() + self.delay(outage.attempts + 1)
        metrics.OUTAGE_RETRIES.labels(cause=cause).inc()

    def leave(self, cause: str) -> Outage | None:
        """``cause`` works again; returns the outage that ended (None if it was not down)."""
        outage = self.outages.pop(cause, None)
        if outage is not None:
            metrics.OUTAGE.labels(cause=cause).set(0)
        if cause == "engine":
            self.failed_batches = 0
        return outage

    def status(self) -> dict[str, Any] | None:
        """What ``StreamPipeline.status()`` reports under ``outage`` (None when nothing is down)."""
        if not self.outages:
            return None
        return {
            o.cause: {
                "reason": o.reason,
                "since": o.since,
                "failed_retries": o.attempts,
                "next_retry_in_s": round(max(0.0, o.retry_at - self._clock()), 3),
            }
            for o in self.outages.values()
        }
