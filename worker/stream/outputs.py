"""Outputs: verdicts and dead letters built, published, acknowledged — or published again after a backoff.

An answered event's verdict (the core's ``Moderator.verdict``) or a rejected record's dead letter is
sent through the ``Publisher``; ``apply_acks`` reads the broker's answers: an acknowledged record is
completed at the checkpoint (and its published marker written to Redis, one pipelined write per call), a
failed delivery is published again after a backoff. An event that failed ``failures.max_publish_attempts``
deliveries is a delivery outage (``FailureGuard``): the stream pauses, retries at most every
``retry_max_s``, and never drops it. Work of a partition that left this consumer is neither published nor
counted (its next owner redoes it).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from kafka.errors import KafkaError

from worker.cache.published import PublishedMarkers
from worker.config import Settings
from worker.contracts.dead_letters import build_dead_letter
from worker.contracts.decode import salvage_event_id
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection
from worker.contracts.verdicts import event_lag_seconds
from worker.moderation.moderator import Answer, Moderator, count_verdict
from worker.ops import metrics
from worker.stream.checkpoint import Checkpoint
from worker.stream.items import Consumed, KeyedRecord, Outcome, record_age_seconds
from worker.stream.outage import FailureGuard
from worker.stream.publisher import Publisher
from worker.stream.records import OutputRecord, VerdictFacts, answer_output

log = logging.getLogger(__name__)

ERROR_REASON_CHARS = 400  # an error quoted in an outage reason, at most


class Outputs:
    """Builds and publishes outcomes, applies acks, re-publishes failures; tallies verdicts per loop turn."""

    def __init__(
        self,
        settings: Settings,
        moderator: Moderator,
        publisher: Publisher,
        markers: PublishedMarkers,
        checkpoint: Checkpoint,
        guard: FailureGuard,
        counters: Counter[str],
    ) -> None:
        self._settings = settings
        self._moderator = moderator
        self.publisher = publisher
        self._markers = markers
        self._checkpoint = checkpoint
        self._guard = guard
        self._counters = counters
        self._republish: list[
            tuple[float, Outcome]
        ] = []  # (monotonic due time, outcome) of failed deliveries
        # Verdicts counted this turn, added to the Prometheus counters once per turn (``flush_metrics``):
        # one ``inc(n)`` per label set instead of several label lookups per event on the hot path.
        self._tally: Counter[tuple[str, tuple[str, ...], bool, str]] = Counter()

    # -- publishing --------------------------------------------------------------------------------------

    def verdict(self, item: KeyedRecord, answer: Answer) -> None:
        """Publish the verdict of ``item`` (unless its partition left)."""
        record, keyed = item.record, item.keyed
        if self._checkpoint.is_stale(record):
            self._counters["dropped_revoked"] += 1
            return
        latency_ms = (time.monotonic() - record.received) * 1000.0
        output, facts, review = answer_output(
            self._moderator,
            self.publisher.encoder,
            keyed,
            answer,
            latency_ms=latency_ms,
            source=record.source,
        )
        count_verdict(keyed.routed.hits, answer.result.halted, review)
        self._publish_verdict(record, output, facts)

    def _publish_verdict(self, record: Consumed, output: OutputRecord, facts: VerdictFacts) -> None:
        self._tally[(facts.decision, facts.codes, facts.cached, facts.model)] += 1
        self._counters["cached" if facts.cached else "verdicts"] += 1
        self._publish(Outcome(record, "verdict", output, facts.created_at))

    def dead_letter(self, record: Consumed, rejection: Rejection, event: ChatEvent | None = None) -> None:
        """Publish a dead letter for ``record`` (unless its partition left)."""
        if self._checkpoint.is_stale(record):
            self._counters["dropped_revoked"] += 1
            return
        dead_letter = build_dead_letter(
            rejection,
            record.raw,
            record.source,
            max_original_bytes=self._settings.limits.dead_letter_original_max_bytes,
            event_id=event.event_id if event is not None else salvage_event_id(record.raw),
            key=record.key,
        )
        log.info(
            "dead letter: %s",
            rejection.reason.value,
            extra={
                "event_id": dead_letter.get("event_id"),  # salvaged from the raw record when decoding failed
                "stage": "dead_letter",
                "reason": rejection.reason.value,
                "topic": record.tp.topic,
                "partition": record.tp.partition,
                "offset": record.offset,
                "field": rejection.field,
            },
        )
        metrics.record_dead_letter(rejection.reason.value)
        self._counters["dead_letters"] += 1
        output = self.publisher.encoder.dead_letter(dead_letter, record.key)
        self._publish(Outcome(record, "dead_letter", output, event.created_at if event is not None else None))

    def _publish(self, outcome: Outcome) -> None:
        self.publisher.publish(outcome.output, outcome)

    def flush_metrics(self) -> None:
        """Add the verdicts tallied this turn to the Prometheus counters."""
        if self._tally:
            metrics.record_verdicts(self._tally)
            self._tally.clear()

    # -- acknowledgements ------------------------------------------------------------------------------

    @property
    def awaiting_acks(self) -> bool:
        """Whether published records wait for the broker's answer."""
        return self.publisher.awaiting_acks

    def apply_acks(self) -> None:
        """Complete acknowledged events (and write their markers); schedule failed ones again."""
        now = time.time()
        acked = []
        ages: list[float] = []
        lags: list[float] = []
        for outcome, error in self.publisher.drain_acks():
            record = outcome.record
            if self._checkpoint.is_stale(record):
                continue
            if error is not None:
                self._delivery_failed(outcome, error)
                continue
            if outcome.failed_deliveries and self._guard.down("delivery"):
                self._guard.leave("delivery")
                log.warning("deliveries work again; resuming", extra={"stage": "publish"})
            if self._checkpoint.complete(record):
                self._counters["completed"] += 1
                acked.append((record.tp, record.offset, record.digest))
                age = record_age_seconds(record.timestamp_ms, now)
                if age is not None:
                    ages.append(age)
                if outcome.created_at is not None:
                    lag = event_lag_seconds(outcome.created_at, now)
                    if lag is not None:
                        lags.append(lag)
        metrics.observe_many(metrics.END_TO_END_SECONDS, ages)
        metrics.observe_many(metrics.EVENT_LAG_SECONDS, lags)
        if acked and self._markers.enabled:
            with metrics.observe_stage("cache"):
                self._markers.mark(acked)

    def settle(self, timeout_s: float) -> None:
        """Send everything buffered, wait for the broker (up to ``timeout_s``), apply the answers.

        Then wait for their published markers to be written: a revoke or drain hands the partitions to
        another worker, which reads the markers when it takes them, and the revoke's commit is
        asynchronous (it may be refused mid-rebalance). A marker still on the writer thread would let the
        next owner publish those records again.
        """
        try:
            self.publisher.flush(timeout_s)
        except KafkaError as exc:  # what is not acknowledged stays uncommitted, and is redone
            log.warning("flush failed: %s", type(exc).__name__, extra={"stage": "publish"})
        self.apply_acks()
        self._markers.settle()

    # -- failed deliveries ------------------------------------------------------------------------------

    def _delivery_failed(self, outcome: Outcome, error: BaseException) -> None:
        """Schedule ``outcome`` to be published again after a backoff; too many failures are an outage."""
        outcome.failed_deliveries += 1
        self._counters["republished"] += 1
        reason = f"{type(error).__name__}: {error}"[:ERROR_REASON_CHARS]
        if outcome.failed_deliveries < self._settings.failures.max_publish_attempts:
            log.warning(
                "delivery failed (%s); publishing again after a backoff",
                type(error).__name__,
                extra={"event_id": outcome.event_id, "stage": "publish"},
            )
        elif self._guard.down("delivery"):
            self._guard.retry_failed("delivery", reason)
        else:
            self._guard.enter("delivery", reason)
            self._counters["outages"] += 1
            log.error(
                "delivery outage: an event failed %d deliveries (%s); pausing consumption, retrying with backoff",
                outcome.failed_deliveries,
                type(error).__name__,
                extra={"event_id": outcome.event_id, "stage": "publish", "reason": "delivery_outage"},
            )
        self._republish.append((time.monotonic() + self._guard.delay(outcome.failed_deliveries), outcome))

    def seconds_until_republish(self) -> float | None:
        """Seconds until the next failed delivery is due again (None: none waiting)."""
        if not self._republish:
            return None
        return max(0.0, min(due for due, _ in self._republish) - time.monotonic())

    def republish_due(self) -> None:
        """Publish again the failed deliveries whose backoff has passed (never dropped, except when revoked)."""
        if not self._republish:
            return
        now, waiting = time.monotonic(), []
        for due, outcome in self._republish:
            if self._checkpoint.is_stale(outcome.record):
                continue
            if due > now:
                waiting.append((due, outcome))
            else:
                self._publish(outcome)
        self._republish = waiting
