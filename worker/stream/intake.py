"""Intake: a poll's records → registered offsets, replays completed, events decoded and routed.

For every record: register its offset with the checkpoint (a re-fetched one is ignored); a replayed record
whose answer the broker already acknowledged (its published marker is in Redis, one MGET per poll) is
completed without output; anything else is decoded (bad input → a ``Rejection``) and routed by the core
(``Moderator.route``: its tenant's policy, the model that judges it). A record another pool's model judges is
completed without output; one no model can judge is a dead letter in exactly one pool
(``ModelRegistry.owns_unrouted``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import TopicPartition

from worker.cache.published import PublishedMarkers, record_digest
from worker.config import Settings
from worker.contracts.decode import decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection
from worker.moderation.moderator import Elsewhere, Moderator
from worker.ops import metrics
from worker.stream.checkpoint import Checkpoint
from worker.stream.items import Consumed, RoutedRecord


@dataclass(slots=True)
class Rejected:
    """A record that becomes a dead letter (with its event when it decoded)."""

    record: Consumed
    rejection: Rejection
    event: ChatEvent | None = None


@dataclass(slots=True)
class Accepted:
    """One poll after intake: events for the lookup, records for the dead-letter topic."""

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
    ) -> None:
        self._settings = settings
        self._moderator = moderator
        self._checkpoint = checkpoint
        self._markers = markers
        self._counters = counters
        self.positions: dict[TopicPartition, int] = {}

    def accept(self, records: dict[TopicPartition, list[Any]]) -> Accepted:
        """Take one poll's records (see the module docstring)."""
        accepted = Accepted()
        if not records:
            return accepted
        with metrics.observe_stage("decode"):  # per poll, not per record: the timer costs as much as decoding
            polled = [(tp, record) for tp, batch in records.items() for record in batch]
            digests = (
                [record_digest(r.value) for _, r in polled] if self._markers.enabled else [b""] * len(polled)
            )
            answered = self._markers.acknowledged(
                [(tp, r.offset, d) for (tp, r), d in zip(polled, digests, strict=True)]
            )
            for (tp, record), digest, done in zip(polled, digests, answered, strict=True):
                generation = self._checkpoint.register(tp, record.offset)
                if generation is None:
                    continue  # re-fetched after a seek: already in flight
                self.positions[tp] = record.offset + 1
                self._counters["consumed"] += 1
                consumed = Consumed.of(tp, record, generation, digest)
                if done:  # answered and acknowledged by an earlier run
                    self._complete_without_output(consumed)
                    self._counters["replays_skipped"] += 1
                    metrics.REPLAYS_SKIPPED.inc()
                    continue
                self._route(consumed, accepted)
        return accepted

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
