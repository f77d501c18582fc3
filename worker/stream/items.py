"""What moves between the stream's steps: one typed stage per step, each complete when it is made.

``Consumed`` (intake: a record and where it came from) → ``Routed`` (decoded, with the model and policy that
judge it) → ``Keyed`` (image bytes fetched, cache key computed: ready for the lookup) → an ``Outcome`` (the
verdict or dead letter published for it). A stage never has a field "filled in later": a step that needs
something takes the stage that has it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kafka.structs import TopicPartition

from worker.contracts.dead_letters import SourceCoordinates

if TYPE_CHECKING:
    from worker.contracts.events import ChatEvent
    from worker.engine.blocklist import BlocklistHit
    from worker.engine.policy import Policy


@dataclass(frozen=True, slots=True, eq=False)
class Consumed:
    """One consumed record (identity = the record): coordinates, its partition's generation, its bytes."""

    tp: TopicPartition
    offset: int
    generation: int  # tracking generation of ``tp`` when consumed; stale once the partition left
    raw: bytes | None
    key: bytes | None
    timestamp_ms: int
    digest: bytes = b""  # record_digest(raw): what its published marker stores
    received: float = 0.0  # time.monotonic() when consumed

    @classmethod
    def of(cls, tp: TopicPartition, record: Any, generation: int, digest: bytes) -> Consumed:
        """The stage of a kafka-python ``ConsumerRecord`` just registered under ``generation``."""
        return cls(
            tp,
            record.offset,
            generation,
            record.value,
            record.key,
            record.timestamp,
            digest,
            time.monotonic(),
        )

    @property
    def source(self) -> SourceCoordinates:
        """Where the record came from (carried by every output)."""
        return SourceCoordinates(self.tp.topic, self.tp.partition, self.offset)


@dataclass(frozen=True, slots=True, eq=False)
class Routed:
    """A decoded event with the configured model that judges it, its policy and its blocklist hits."""

    record: Consumed
    event: ChatEvent
    policy: Policy
    model: str
    hits: tuple[BlocklistHit, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class Keyed:
    """A routed event with its images' bytes (in order; empty for text) and its cache key."""

    routed: Routed
    images: tuple[bytes, ...]
    cache_key: str

    @property
    def record(self) -> Consumed:
        return self.routed.record

    @property
    def modality(self) -> Literal["image", "text"]:
        return "image" if self.images else "text"


@dataclass(slots=True, eq=False)
class Outcome:
    """What is published for one record: a verdict or a dead letter, kept to publish again after a failure."""

    record: Consumed
    kind: Literal["verdict", "dead_letter"]
    body: dict[str, Any]
    event: ChatEvent | None = None
    failed_deliveries: int = 0

    @property
    def event_id(self) -> str | None:
        return self.body.get("event_id")
