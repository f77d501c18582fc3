"""FailureGuard: when failures become an outage, how retries are spaced, and what status reports."""

from __future__ import annotations

from worker.config import FailureSettings
from worker.ops import metrics
from worker.stream.outage import FailureGuard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def outage_gauge(cause: str) -> float:
    return metrics.OUTAGE.labels(cause=cause)._value.get()


def test_the_run_of_failed_batches_reaches_the_limit_and_a_success_resets_it():
    guard = FailureGuard(FailureSettings(max_failed_batches=3))
    assert not guard.batch_failed() and not guard.batch_failed()
    guard.batch_succeeded()
    assert [guard.batch_failed() for _ in range(3)] == [False, False, True]


def test_retry_delays_grow_exponentially_and_stop_at_the_cap():
    guard = FailureGuard(FailureSettings(retry_initial_s=1.0, retry_max_s=10.0))
    delays = [guard.delay(attempt) for attempt in range(1, 9)]
    assert 1.0 <= delays[0] <= 1.5  # initial + at most half of it as jitter
    assert delays[2] > delays[0] * 2
    assert max(delays) == delays[-1] == 10.0


def test_an_outage_is_declared_once_retried_after_its_backoff_and_ends_on_leave():
    clock = Clock()
    guard = FailureGuard(FailureSettings(retry_initial_s=1.0, retry_max_s=4.0), clock=clock)
    declared = metrics.OUTAGES.labels(cause="engine")._value.get()
    guard.enter("engine", "model produced a non-finite score")
    guard.enter("engine", "again")  # idempotent
    assert guard.active and guard.down("engine") and not guard.down("delivery")
    assert metrics.OUTAGES.labels(cause="engine")._value.get() == declared + 1
    assert outage_gauge("engine") == 1
    assert not guard.retry_due("engine")
    clock.now += 1.6
    assert guard.retry_due("engine")
    guard.retry_failed("engine", "still NaN")
    assert not guard.retry_due("engine")
    status = guard.status()
    assert status is not None
    assert status["engine"]["failed_retries"] == 1 and status["engine"]["reason"] == "still NaN"
    assert 0 < status["engine"]["next_retry_in_s"] <= 4.0
    ended = guard.leave("engine")
    assert ended is not None and ended.attempts == 1
    assert not guard.active and guard.status() is None and outage_gauge("engine") == 0
