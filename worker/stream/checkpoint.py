"""The checkpoint: the one routine that commits, used by the interval, the revoke and the drain alike.

Quix Streams' checkpoint is one readable function — flush the sinks, flush the producer, commit — and so is
this one: ``commit(cause)`` settles the outputs (flush the producer and apply the broker's acks, except on
the interval, which only takes what has been acknowledged already), asks the ``OffsetTracker`` for the
committable offsets, and commits them. The cause decides only *how*:

- ``interval`` (every ``COMMIT_INTERVAL_S`` from the loop, sooner once nothing is in flight) and ``drain``
  (shutdown): a synchronous commit; the offsets are recorded as committed only once the coordinator accepted them;
- ``revoke`` (inside the rebalance callback): an asynchronous commit of the revoked partitions — kafka-python 3
  raises on a blocking commit there — not recorded as committed, so a kept partition's next interval commit
  repeats it and a lost async commit leaves no false record.

A failed commit (a rebalance under way) is logged and retried by the next interval: the next owner replays at
most the uncommitted tail. The tracker (``worker.stream.offsets``) decides *what* may be committed; this
module is the only place that commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from operator import attrgetter
from typing import Any, Literal

from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.ops import metrics
from worker.stream.items import Consumed
from worker.stream.offsets import OffsetTracker

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.2  # commit completed offsets at most this often (and always at revoke/drain)
# ... and sooner, once nothing is in flight (a burst ended, or the worker keeps up with a trickle): the completed
# offsets are committed without waiting for the interval, but at most this often (a sync commit is a round trip).
CAUGHT_UP_COMMIT_S = 0.05
REVOKE_FLUSH_S = 5.0  # how long a revoke waits for unacknowledged outputs before committing what is complete

CommitCause = Literal["interval", "revoke", "drain"]


class Checkpoint:
    """Owns the offset tracker and the consumer's commits; ``settle(timeout_s)`` flushes and applies acks."""

    def __init__(self, consumer: Any, settle: Callable[[float], None]) -> None:
        self.tracker = OffsetTracker()
        self._consumer = consumer
        self._settle = settle
        self._last_commit = 0.0

    # -- offsets ----------------------------------------------------------------------------------

    def register_many(self, tp: TopicPartition, offsets: Sequence[int]) -> tuple[int, list[int]]:
        """Record consumed offsets of one partition: its generation, and the indices of those not re-fetched."""
        registered = self.tracker.register_many(tp, offsets)
        generation = self.tracker.generation(tp)
        assert generation is not None  # registering tracks the partition
        return generation, registered

    def is_stale(self, record: Consumed) -> bool:
        """Whether ``record``'s partition left since it was consumed (its next owner redoes it).

        A partition kept across a rebalance keeps its generation: its in-flight records are not stale.
        """
        return self.tracker.generation(record.tp) != record.generation

    def complete(self, record: Consumed) -> bool:
        """Mark ``record`` answered (its outputs acknowledged, or nothing to publish); False if stale."""
        return self.tracker.complete(record.tp, record.offset, record.generation)

    def complete_many(self, records: Sequence[Consumed]) -> list[Consumed]:
        """``complete`` of each of ``records`` (in consumption order, as a poll gave them): those completed."""
        done: list[Consumed] = []
        for (tp, generation), group in groupby(records, key=attrgetter("tp", "generation")):
            run = list(group)
            completed = self.tracker.complete_many(tp, [record.offset for record in run], generation)
            done.extend(run if len(completed) == len(run) else (run[i] for i in completed))
        return done

    # -- the commit routine -----------------------------------------------------------------------

    def commit_if_due(self) -> None:
        """The interval's commit, every ``COMMIT_INTERVAL_S``; or sooner (``CAUGHT_UP_COMMIT_S``) when nothing is
        in flight and a completed offset is not committed yet: the end of a burst is committed at once, not up to
        an interval later (less to replay after a crash, consumer lag at zero sooner). A loaded worker always has
        records in flight, so it commits on the interval alone."""
        since = time.monotonic() - self._last_commit
        if since >= COMMIT_INTERVAL_S or (since >= CAUGHT_UP_COMMIT_S and self.tracker.caught_up()):
            self.commit("interval")

    def seconds_until_due(self) -> float | None:
        """How long until ``commit_if_due`` commits what is completed now (None: nothing is waiting for it), so
        a turn that would otherwise wait in poll comes back for a caught-up commit in time."""
        if not self.tracker.caught_up():
            return None
        return max(0.0, self._last_commit + CAUGHT_UP_COMMIT_S - time.monotonic())

    def commit(
        self,
        cause: CommitCause,
        partitions: Iterable[TopicPartition] | None = None,
        *,
        flush_s: float = REVOKE_FLUSH_S,
    ) -> None:
        """Settle the outputs (not on the interval), then commit every completed offset (of ``partitions``)."""
        if cause != "interval":
            self._settle(flush_s)
        self._last_commit = time.monotonic()
        offsets = self.tracker.committable(partitions)
        if not offsets:
            return
        try:
            with metrics.observe_stage("commit"):
                if cause == "revoke":
                    self._consumer.commit_async(offsets)
                    return
                self._consumer.commit(offsets)
        except KafkaError as exc:  # e.g. a rebalance is under way: the next owner replays at most these
            log.warning("commit on %s failed: %s", cause, type(exc).__name__, extra={"stage": "commit"})
            return
        self.tracker.mark_committed(offsets)
