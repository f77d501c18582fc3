"""Partitions: what this consumer holds, what it pauses, and what a rebalance changes.

- Rebalance callbacks (run by kafka-python inside ``poll``, on the loop thread): a revoke commits what is
  complete (the checkpoint's routine) and forgets the partitions the client already dropped, holding the
  others until the new assignment (eager protocol); an assignment tracks new partitions and keeps the kept
  ones with their work; a lost membership forgets everything at once. See ``worker.stream.offsets``.
- Backpressure: above ``batching.max_in_flight`` events in flight every assigned partition is paused; below
  ``resume_below`` they resume. In an outage (or while draining) every partition stays paused. On
  confluent-kafka, whose pause drops the records it prefetched, the loop first holds back for up to
  ``HOLD_BACK_S`` (it stops taking records) and pauses only when that was not enough.

``paused`` is what this consumer paused and the client still holds paused: kafka-python keeps the paused
flag of a partition kept across a rebalance and clears it for one that left, so partitions that left are
forgotten, and partitions assigned while paused are paused too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener
from kafka.structs import TopicPartition

from worker.config import BatchingSettings
from worker.ops import metrics
from worker.stream.checkpoint import Checkpoint

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 1.0  # refresh the per-partition lag gauge this often
# Longest the loop holds back (takes no records, pauses nothing) above the in-flight bound before it pauses, on a
# client whose pause drops what it prefetched; far below max.poll.interval.ms, and rebalance callbacks (run inside
# poll) wait at most this long.
HOLD_BACK_S = 1.0


class Partitions(ConsumerRebalanceListener):
    """The assignment, pauses and rebalance callbacks of one consumer; ``forget(tps)`` drops their local work."""

    def __init__(
        self,
        consumer: Any,
        checkpoint: Checkpoint,
        batching: BatchingSettings,
        forget: Callable[[set[TopicPartition]], int],
    ) -> None:
        self._consumer = consumer
        self._checkpoint = checkpoint
        self._forget_work = forget
        self._max_in_flight = batching.max_in_flight
        self._resume_below = (
            batching.resume_below if batching.resume_below is not None else batching.max_in_flight // 2
        )
        self.assigned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        # Holding back (see ``regulate``): the loop takes no records though nothing is paused.
        self.holding = False
        self._holding_since: float | None = None
        self._purges_on_pause = bool(getattr(consumer, "purges_on_pause", False))
        self._last_lag = 0.0

    # -- rebalance callbacks -------------------------------------------------------------------------

    def on_partitions_revoked(self, revoked: Any) -> None:
        """Commit what is complete; forget the partitions the client already dropped, hold the others.

        Eager protocol: every partition is revoked before the rejoin while the client still holds them; the
        ones it keeps keep their fetch position, so their in-flight work must stay. Cooperative: only
        partitions that left are revoked, already dropped.
        """
        revoked = set(revoked)
        self._checkpoint.commit("revoke", revoked)
        gone, waiting = self._forget(self._checkpoint.tracker.revoke(revoked, self._consumer.assignment()))
        if revoked:
            log.info(
                "partitions revoked: %d (%d left, dropped %d waiting events)",
                len(revoked),
                len(gone),
                waiting,
                extra={"stage": "rebalance"},
            )

    def on_partitions_assigned(self, assigned: Any) -> None:
        """Track new partitions (they start at the committed offset); keep the ones kept across the rebalance."""
        assigned = set(assigned)
        gone, _ = self._forget(self._checkpoint.tracker.assign(assigned))
        self.assigned |= assigned
        log.info(
            "partitions assigned: %s (%d left)",
            sorted(tp.partition for tp in assigned),
            len(gone),
            extra={"stage": "rebalance"},
        )

    def on_partitions_lost(self, lost: Any) -> None:
        """The group evicted this member: forget everything at once (commits would be refused)."""
        lost = set(lost)
        _, waiting = self._forget(self._checkpoint.tracker.lose(lost))
        if lost:
            log.warning(
                "partitions lost: %d (dropped %d waiting events)",
                len(lost),
                waiting,
                extra={"stage": "rebalance"},
            )

    def _forget(self, gone: set[TopicPartition]) -> tuple[set[TopicPartition], int]:
        """Drop the local state of partitions that left; returns them and the waiting events dropped."""
        if not gone:
            return gone, 0
        for tp in gone:
            metrics.forget_partition(tp.topic, tp.partition)
        self.assigned -= gone
        self.paused -= gone
        return gone, self._forget_work(gone)

    # -- pausing ---------------------------------------------------------------------------------------

    def _sync(self) -> set[TopicPartition]:
        """Forget what the client no longer holds (a per-turn safety net); returns its assignment."""
        assignment = set(self._consumer.assignment())
        self._forget(self._checkpoint.tracker.retain(assignment))
        self.paused &= assignment
        return assignment

    def regulate(self, *, hold: bool) -> None:
        """Pause above the in-flight bound (or everything while ``hold``: an outage); resume below the low mark.

        On a client that drops its prefetched records on a pause (``purges_on_pause``: confluent-kafka, which
        then takes 0.5–1 s to fetch them again on a tansu broker), the bound first only holds back: the loop
        stops taking records (``holding``) for up to ``HOLD_BACK_S``, which a burst of in-flight work rarely
        outlasts, and pauses only after that.
        """
        assignment = self._sync()
        in_flight = self._checkpoint.tracker.in_flight()
        over = in_flight > self._max_in_flight or (
            (self.paused or self.holding) and in_flight > self._resume_below
        )
        if over and not hold and not self.paused and self._purges_on_pause:
            now = time.monotonic()
            if self._holding_since is None:
                self._holding_since = now
            if now - self._holding_since < HOLD_BACK_S:
                self.holding = True
                metrics.PAUSED_PARTITIONS.set(len(assignment))
                return
        self.holding = False
        if not over:
            self._holding_since = None
        if hold or over:
            newly = assignment - self.paused
            if newly:
                self._consumer.pause(*newly)
                if not self.paused and not hold:
                    log.info(
                        "paused %d partitions (%d in flight)",
                        len(newly),
                        in_flight,
                        extra={"stage": "backpressure"},
                    )
                self.paused |= newly
        elif self.paused:
            self._consumer.resume(*self.paused)
            self.paused = set()
        metrics.PAUSED_PARTITIONS.set(len(self.paused))

    def pause_all(self) -> None:
        """Stop fetching (the drain): every assigned partition paused, whatever the in-flight count."""
        self.holding = False  # the drain's polls serve the rebalance callbacks
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(*assignment)

    # -- lag ----------------------------------------------------------------------------------------------

    def update_lag(self, positions: dict[TopicPartition, int]) -> None:
        """Refresh ``mw_consumer_lag`` at most every ``LAG_INTERVAL_S`` from the fetch responses' high-water marks."""
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = now
        for tp in self.assigned:
            # The high-water mark comes with fetch responses; tansu answers LATEST lookups wrongly.
            highwater = self._consumer.highwater(tp)
            position = positions.get(tp)
            if highwater is not None and position is not None:
                metrics.set_partition_lag(tp.topic, tp.partition, highwater - position)
