"""Published markers: which source records already have an answer the broker acknowledged.

After a crash the uncommitted tail of each partition is consumed again. Most of it was already answered —
answered offsets wait, uncommitted, behind the slowest item of their partition — and re-publishing them
doubles the output. So once the broker has acknowledged every output of a record, the pipeline writes a
marker for it to Redis (all of a loop turn in one call, with a TTL); on intake, one read per poll finds the
replayed records that are marked, and they are completed without being published again.

A marker is the record's digest (``DIGEST_BYTES``) in the slot of its offset in a block of ``BLOCK_OFFSETS``
consecutive offsets of its partition: the string key ``<prefix>pub:<group>:<topic>:<partition>:b<block>``,
written with SETRANGE — one command per contiguous run of answered offsets, not one key per record (a wave of
cache hits marks thousands of records a second). A slot never written reads as zero bytes, which no digest
equals; a block's TTL starts again at each write into it, so a marker lives at least
``redis.published_marker_ttl_s``. The digest makes a marker left by another record at the same coordinates
(a topic deleted and re-created) not match, and the key holds the consumer group, since another group reading
the same topic publishes its own answers.

Per partition, a high-water mark key (``...:<partition>:high``, the highest offset marked there) spares the
lookups in the steady state: an offset above it was never answered, so only a replayed tail is looked up.

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
from collections.abc import Callable, Sequence

from kafka.structs import TopicPartition

from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.moderation.routing import consumer_group_id

DIGEST_BYTES = 8  # a record's identity at its coordinates, not a security boundary
BLOCK_OFFSETS = 1024  # offsets per marker key: a block is at most 8 KiB
_UNMARKED = bytes(DIGEST_BYTES)  # what a slot never written holds
_NOT_UNMARKED = (1).to_bytes(DIGEST_BYTES, "big")


def record_digest(value: bytes | None) -> bytes:
    """A short digest of a record's value (what a marker stores); never all zero bytes (an unwritten slot)."""
    digest = hashlib.blake2b(value or b"", digest_size=DIGEST_BYTES).digest()
    return digest if digest != _UNMARKED else _NOT_UNMARKED


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
        self._last_write: cf.Future[object] | None = None

    def _block_key(self, tp: TopicPartition, block: int) -> str:
        return f"{self._prefix}{tp.topic}:{tp.partition}:b{block}"

    def _runs(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[tuple[str, int, list[int]]]:
        """Indices of ``records`` in runs of consecutive offsets within one block of one partition, in the order
        given: ``(block key, byte offset of the first one's slot, indices)``. A poll's records come grouped by
        partition in offset order, so a chunk of them is a few runs; any other order only makes more, shorter
        runs."""
        runs: list[tuple[str, int, list[int]]] = []
        last_tp: TopicPartition | None = None
        last_offset = -2
        for i, (tp, offset, _) in enumerate(records):
            if offset == last_offset + 1 and offset % BLOCK_OFFSETS and tp == last_tp:
                runs[-1][2].append(i)
            else:
                block, slot = divmod(offset, BLOCK_OFFSETS)
                runs.append((self._block_key(tp, block), slot * DIGEST_BYTES, [i]))
                last_tp = tp
            last_offset = offset
        return runs

    def _high_key(self, tp: TopicPartition) -> str:
        return f"{self._prefix}{tp.topic}:{tp.partition}:high"

    def high_water_marks(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The highest offset marked per partition (-1: none): only offsets at or below it can be marked.

        Read from Redis once per partition (one MGET for those not known yet) until ``forget``; a partition missing
        from the answer is unknown for now (Redis is down: nothing is looked up, and it is read again next time).
        """
        unknown = [tp for tp in partitions if tp not in self._high]
        if unknown and self.enabled:
            self.settle()
            stored = self._cache.get_raw([self._high_key(tp) for tp in unknown])
            if stored is not None:
                for tp, value in zip(unknown, stored, strict=True):
                    self._high[tp] = int(value) if value is not None and value.isdigit() else -1
        return self._high

    def acknowledged(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[bool]:
        """For each ``(tp, offset, digest)``: whether its answer was already acknowledged.

        Only an offset at or below its partition's high-water mark (the highest offset marked there, read
        once per partition until ``forget``) can have a marker: the rest are not looked up at all, so in the
        steady state intake costs Redis nothing; after a crash, the replayed tail is looked up (one MGET).
        """
        answered = [False] * len(records)
        if not self.enabled or not records:
            return answered
        high = self.high_water_marks(list({tp for tp, _, _ in records}))
        candidates = [i for i, (tp, offset, _) in enumerate(records) if offset <= high.get(tp, -1)]
        if not candidates:
            return answered
        self.settle()  # this worker's own marks first (a seek back within an assignment)
        runs = self._runs([records[i] for i in candidates])
        stored = self._cache.get_ranges(
            [(key, at, at + len(run) * DIGEST_BYTES - 1) for key, at, run in runs]
        )
        if stored is not None:
            for (_, _, run), data in zip(runs, stored, strict=True):
                for slot, j in enumerate(run):
                    i = candidates[j]
                    answered[i] = data[slot * DIGEST_BYTES : (slot + 1) * DIGEST_BYTES] == records[i][2]
        return answered

    def mark(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> None:
        """Record that the answers of ``(tp, offset, digest)`` are acknowledged (one round trip).

        A partition's high-water mark is written after them when it rises (never lowered by this worker). The
        writes happen on the markers' own thread; ``acknowledged`` and ``close`` wait for them when they need to.
        """
        if not self.enabled or not records:
            return
        ranges = self._ranges(records)
        risen = self._risen_items(records)
        self._submit(
            lambda: (self._cache.set_ranges(ranges, self._ttl), self._cache.set_raw(risen, self._ttl))
        )

    def _ranges(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> list[tuple[str, int, bytes]]:
        """The block writes of ``(tp, offset, digest)``: one ``(key, byte offset, digests)`` per run."""
        return [(key, at, b"".join(records[i][2] for i in run)) for key, at, run in self._runs(records)]

    def write_offsets(self, records: Sequence[tuple[TopicPartition, int, bytes]]) -> None:
        """Write the markers of ``records`` now, on this thread, without high-water marks (intake processes)."""
        if self.enabled and records:
            self._cache.set_ranges(self._ranges(records), self._ttl)

    def raise_high(self, records: Sequence[tuple[TopicPartition, int]]) -> None:
        """Raise the high-water marks to cover ``(tp, offset)``, whose markers are written already."""
        if self.enabled and records:
            risen = self._risen_items(records)
            if risen:
                self._submit(lambda: self._cache.set_raw(risen, self._ttl))

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

    def _submit(self, write: Callable[[], object]) -> None:
        if self._writer is None:
            self._writer = cf.ThreadPoolExecutor(1, thread_name_prefix="published-markers")
        self._last_write = self._writer.submit(write)  # in order: one writer thread

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
