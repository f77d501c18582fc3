"""What moves between the stream's steps: a record's coordinates beside the core's typed stage.

The moderation core (``worker.moderation.moderator``) takes an event through ``Routed`` → ``Keyed`` →
``Ready``; on the stream each stage also carries the record it came from, so every step can publish, complete
and commit it: ``Consumed`` (intake) → ``RoutedRecord`` → ``KeyedRecord`` (lookup, classify) → ``Outcome``
(outputs). A stage never has a field "filled in later": a step that needs something takes the stage that has
it. Stages are never mutated (only an ``Outcome`` counts its failed deliveries); they are plain slotted classes,
not frozen ones, because a frozen dataclass costs twice as much to build and these are built per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kafka.structs import TopicPartition

from worker.cache.published import record_digest
from worker.contracts.dead_letters import SourceCoordinates

if TYPE_CHECKING:
    from worker.contracts.events import ChatEvent
    from worker.moderation.moderator import Keyed, Routed
    from worker.stream.records import OutputRecord


def record_age_seconds(timestamp_ms: int, now: float) -> float | None:
    """Seconds from a Kafka record's timestamp (ms) to ``now`` (epoch seconds); None when it has none.

    What ``mw_end_to_end_seconds`` observes when a record's outputs are acknowledged (by the loop thread or
    an intake process).
    """
    return max(0.0, now - timestamp_ms / 1000.0) if timestamp_ms and timestamp_ms > 0 else None


@dataclass(slots=True, eq=False)
class Consumed:
    """One consumed record (identity = the record): coordinates, its partition's generation, its bytes."""

    tp: TopicPartition
    offset: int
    generation: int  # tracking generation of ``tp`` when consumed; stale once the partition left
    raw: bytes | None
    key: bytes | None
    timestamp_ms: int
    received: float = 0.0  # time.monotonic() when consumed
    # record_digest(raw), computed when first asked for: only a replayed or published record's marker needs it.
    _digest: bytes | None = field(default=None, repr=False)

    @property
    def digest(self) -> bytes:
        """``record_digest(raw)``: what the record's published marker stores."""
        if self._digest is None:
            self._digest = record_digest(self.raw)
        return self._digest

    @property
    def source(self) -> SourceCoordinates:
        """Where the record came from (carried by every output)."""
        return SourceCoordinates(self.tp.topic, self.tp.partition, self.offset)


@dataclass(slots=True, eq=False)
class RoutedRecord:
    """A record whose event is routed: the policy, the model that judges it, its blocklist hits."""

    record: Consumed
    routed: Routed


@dataclass(slots=True, eq=False)
class KeyedRecord:
    """A record whose event has its images' bytes and its cache key: ready for the lookup."""

    record: Consumed
    keyed: Keyed

    @property
    def event(self) -> ChatEvent:
        return self.keyed.routed.event


@dataclass(slots=True, eq=False)
class Outcome:
    """What is published for one record: a verdict or a dead letter, kept to publish again after a failure."""

    record: Consumed
    kind: Literal["verdict", "dead_letter"]
    output: OutputRecord
    # The event's ``created_at`` (event lag is measured when it is acknowledged).
    created_at: str | None = None
    failed_deliveries: int = 0

    @property
    def event_id(self) -> str | None:
        return self.output.event_id
