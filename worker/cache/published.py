"""Published markers: which source records already have an answer the broker acknowledged.

After a crash the uncommitted tail of each partition is consumed again. Most of it was already answered —
answered offsets wait, uncommitted, behind the slowest item of their partition — and re-publishing them
doubles the output. So once the broker has acknowledged every output of a record, the pipeline writes a
marker ``<prefix>pub:<group>:<topic>:<partition>:<offset>`` (all of a loop turn in one call, with a TTL);
on intake, one MGET per poll finds the replayed records that are marked, and they are completed without
being published again.

The marker's value is a digest of the record's bytes: a marker left by another record at the same
coordinates (a topic deleted and re-created) does not match and is ignored. The key holds the consumer
group, since another group reading the same topic publishes its own answers.

What still duplicates: a record whose outputs were acknowledged but whose marker was not written yet when
the worker died (the loop applies acks every few milliseconds, also during a forward pass), outputs sent but
not yet acknowledged at the crash, and everything replayed while Redis is down or after the marker's TTL
(markers are an optimisation, like the verdict cache: never a dependency).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kafka.structs import TopicPartition

from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.moderation.routing import consumer_group_id

DIGEST_BYTES = 8  # a record's identity at its coordinates, not a security boundary


def record_digest(value: bytes | None) -> bytes:
    """A short digest of a record's value (what a marker stores)."""
    return hashlib.blake2b(value or b"", digest_size=DIGEST_BYTES).digest()


class PublishedMarkers:
    """Marks and looks up acknowledged source records in the verdict cache's Redis (never raises on an outage)."""

    def __init__(self, cache: VerdictCache, settings: Settings) -> None:
        self._cache = cache
        # The worker's own consumer group (a split pool reads the topic in a group of its own, and
        # completes another pool's events without output: its markers must never hide them from that pool).
        self._prefix = f"{settings.redis.key_prefix}pub:{consumer_group_id(settings)}:"
        self._ttl = settings.redis.published_marker_ttl_s
        self.enabled = cache.enabled and settings.redis.published_markers

    def _key(self, tp: TopicPartition, offset: int) -> str:
        return f"{self._prefix}{tp.topic}:{tp.partition}:{offset}"

    def acknowledged(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[bool]:
        """For each ``(tp, offset, digest)``: whether its answer was already acknowledged (one MGET)."""
        if not self.enabled or not records:
            return [False] * len(records)
        stored = self._cache.get_raw([self._key(tp, offset) for tp, offset, _ in records])
        if stored is None:
            return [False] * len(records)
        return [value == digest for value, (_, _, digest) in zip(stored, records, strict=True)]

    def mark(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> None:
        """Record that the answers of ``(tp, offset, digest)`` are acknowledged (one round trip per 512)."""
        if self.enabled and records:
            self._cache.set_raw(
                [(self._key(tp, offset), digest) for tp, offset, digest in records], self._ttl
            )
