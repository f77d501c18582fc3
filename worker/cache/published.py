"""Published markers: which source records already have an answer the broker acknowledged.

After a crash the uncommitted tail of each partition is consumed again. Most of it was already answered —
answered offsets wait, uncommitted, behind the slowest item of their partition — and re-publishing them
doubles the output. So once the broker has acknowledged every output of a record, the pipeline writes a
marker ``<prefix>pub:<group>:<topic>:<partition>:<offset>`` (all of a loop turn in one call, with a TTL);
on intake, one MGET per poll finds the replayed records that are marked, and they are completed without
being published again.

Per partition, a high-water mark key (``...:<partition>:high``, the highest offset marked there) spares the
lookups in the steady state: an offset above it was never answered, so only a replayed tail is looked up.
The marker's value is a digest of the record's bytes: a marker left by another record at the same
coordinates (a topic deleted and re-created) does not match and is ignored. The key holds the consumer
group, since another group reading the same topic publishes its own answers.

What still duplicates: a record whose outputs were acknowledged but whose marker was not written yet when
the worker died (the loop applies acks every few milliseconds, also during a forward pass), outputs sent but
not yet acknowledged at the crash, verdicts an intake process published but could not report (it died, hung,
or waited past its ack timeout: the loop thread publishes those again), and everything replayed while Redis is
down or after the marker's TTL (markers are an optimisation, like the verdict cache: never a dependency).

An intake process writes the markers of the records it published itself (``write_offsets``), before it
reports them; the worker then raises the high-water marks (``raise_high``), so one writer keeps each from
going down.
"""

from __future__ import annotations

import concurrent.futures as cf
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
        # Per partition: the highest offset known to be marked (-1: none), read from Redis once per assignment.
        self._high: dict[TopicPartition, int] = {}
        # Writes go to Redis on a thread of their own, in order: the loop thread never waits for a round trip.
        self._writer: cf.ThreadPoolExecutor | None = None
        self._last_write: cf.Future[None] | None = None

    def _key(self, tp: TopicPartition, offset: int) -> str:
        return f"{self._prefix}{tp.topic}:{tp.partition}:{offset}"

    def _high_key(self, tp: TopicPartition) -> str:
        return f"{self._prefix}{tp.topic}:{tp.partition}:high"

    def acknowledged(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[bool]:
        """For each ``(tp, offset, digest)``: whether its answer was already acknowledged.

        Only an offset at or below its partition's high-water mark (the highest offset marked there, read
        once per partition until ``forget``) can have a marker: the rest are not looked up at all, so in the
        steady state intake costs Redis nothing; after a crash, the replayed tail is looked up (one MGET).
        """
        answered = [False] * len(records)
        if not self.enabled or not records:
            return answered
        unknown = list({tp for tp, _, _ in records if tp not in self._high})
        if unknown:
            self.settle()
            stored = self._cache.get_raw([self._high_key(tp) for tp in unknown])
            if stored is None:
                return answered  # Redis is down: nothing is known (learnt again on the next poll)
            for tp, value in zip(unknown, stored, strict=True):
                self._high[tp] = int(value) if value is not None and value.isdigit() else -1
        high = self._high
        candidates = [i for i, (tp, offset, _) in enumerate(records) if offset <= high[tp]]
        if not candidates:
            return answered
        self.settle()  # this worker's own marks first (a seek back within an assignment)
        stored = self._cache.get_raw([self._key(records[i][0], records[i][1]) for i in candidates])
        if stored is not None:
            for i, value in zip(candidates, stored, strict=True):
                answered[i] = value == records[i][2]
        return answered

    def mark(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> None:
        """Record that the answers of ``(tp, offset, digest)`` are acknowledged (one round trip per 512).

        A partition's high-water mark is written with them when it rises (never lowered by this worker). The
        write happens on the markers' own thread; ``acknowledged`` and ``close`` wait for it when they need to.
        """
        if not self.enabled or not records:
            return
        self._write(self._offset_items(records) + self._risen_items(records))

    def _offset_items(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[tuple[str, bytes]]:
        """The marker keys and values of ``(tp, offset, digest)``, without the high-water marks."""
        return [(self._key(tp, offset), digest) for tp, offset, digest in records]

    def write_offsets(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> None:
        """Write the markers of ``records`` now, on this thread, without high-water marks (intake processes)."""
        if self.enabled and records:
            self._cache.set_raw(self._offset_items(records), self._ttl)

    def raise_high(self, records: Sequence[tuple[TopicPartition, int]]) -> None:
        """Raise the high-water marks to cover ``(tp, offset)``, whose markers are written already."""
        if self.enabled and records:
            self._write(self._risen_items(records))

    def _risen_items(
        self, records: Sequence[tuple[TopicPartition, int] | tuple[TopicPartition, int, bytes]]
    ) -> list[tuple[str, bytes]]:
        risen: dict[TopicPartition, int] = {}
        for record in records:
            tp, offset = record[0], record[1]
            if offset > self._high.get(tp, -1) and offset > risen.get(tp, -1):
                risen[tp] = offset
        for tp, offset in risen.items():
            self._high[tp] = offset
        return [(self._high_key(tp), str(offset).encode()) for tp, offset in risen.items()]

    def _write(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        if self._writer is None:
            self._writer = cf.ThreadPoolExecutor(1, thread_name_prefix="published-markers")
        self._last_write = self._writer.submit(self._cache.set_raw, items, self._ttl)

    def settle(self) -> None:
        """Wait until every mark made so far is written (or given up: an outage drops marks, never raises)."""
        if self._last_write is not None:
            self._last_write.result()
            self._last_write = None

    def close(self) -> None:
        """Write what is marked, then stop the writer thread (before the cache closes)."""
        self.settle()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def forget(self, tp: TopicPartition) -> None:
        """``tp`` left this consumer: read its high-water mark again if it comes back (another worker marked)."""
        self._high.pop(tp, None)
