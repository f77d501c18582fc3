"""Published markers against a real Redis: marked records are found, others and look-alikes are not."""

from kafka.structs import TopicPartition

from worker.cache import published
from worker.cache.published import BLOCK_OFFSETS, DIGEST_BYTES, PublishedMarkers, record_digest
from worker.cache.redis_cache import VerdictCache

TP = TopicPartition("chat.events", 2)


def test_a_marked_record_is_acknowledged_and_a_different_record_at_its_offset_is_not(services, make_settings):
    settings = make_settings()
    cache = VerdictCache(settings.redis)
    try:
        markers = PublishedMarkers(cache, settings)
        first, second = record_digest(b'{"event_id": "a"}'), record_digest(b'{"event_id": "b"}')
        markers.mark([(TP, 10, first), (TP, 11, second)])
        assert markers.acknowledged([(TP, 10, first), (TP, 11, second), (TP, 12, first)]) == [
            True,
            True,
            False,
        ]
        # The topic was re-created: offset 10 now holds another record; its old marker must not match.
        assert markers.acknowledged([(TP, 10, second)]) == [False]
        # Another consumer group publishes its own answers.
        settings.kafka.group_id = "another-group"
        assert PublishedMarkers(cache, settings).acknowledged([(TP, 10, first)]) == [False]
        markers.close()
    finally:
        cache.close()


def test_markers_answer_not_acknowledged_while_redis_is_unreachable_or_they_are_off(make_settings):
    settings = make_settings(redis__url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    cache = VerdictCache(settings.redis)
    try:
        markers = PublishedMarkers(cache, settings)
        digest = record_digest(b"x")
        markers.mark([(TP, 1, digest)])  # never raises
        assert markers.acknowledged([(TP, 1, digest)]) == [False]
    finally:
        cache.close()
    settings = make_settings(redis__published_markers=False)
    cache = VerdictCache(settings.redis)
    try:
        markers = PublishedMarkers(cache, settings)
        assert not markers.enabled
        markers.mark([(TP, 1, record_digest(b"x"))])
        assert markers.acknowledged([(TP, 1, record_digest(b"x"))]) == [False]
    finally:
        cache.close()


class CountingCache:
    """The real cache, counting the keys each read asks Redis for."""

    def __init__(self, cache: VerdictCache) -> None:
        self.cache = cache
        self.reads: list[list[str]] = []
        self.enabled = cache.enabled

    def get_raw(self, keys):
        self.reads.append(list(keys))
        return self.cache.get_raw(keys)

    def get_ranges(self, items):
        self.reads.append(list(items))
        return self.cache.get_ranges(items)

    def set_raw(self, items, ttl_s):
        return self.cache.set_raw(items, ttl_s)

    def set_ranges(self, items, ttl_s):
        return self.cache.set_ranges(items, ttl_s)


def test_offsets_above_a_partitions_high_water_mark_are_not_looked_up(services, make_settings):
    settings = make_settings()
    cache = VerdictCache(settings.redis)
    try:
        digest = record_digest(b"r")
        earlier = PublishedMarkers(cache, settings)  # the partition's previous owner
        earlier.mark([(TP, 5, digest), (TP, 7, digest)])
        earlier.mark([(TP, 6, digest)])  # acks out of order: the high-water mark stays 7
        earlier.close()  # its writes are done (they happen on the markers' own thread)

        counting = CountingCache(cache)
        markers = PublishedMarkers(counting, settings)  # type: ignore[arg-type]
        replayed = [(TP, offset, digest) for offset in range(5, 10)]
        assert markers.acknowledged(replayed) == [True, True, True, False, False]
        high, lookups = counting.reads
        assert high == [markers._high_key(TP)]
        # One range: the slots of offsets 5-7 (at or below 7); 8 and 9 were never answered.
        assert lookups == [(markers._block_key(TP, 0), 5 * DIGEST_BYTES, 8 * DIGEST_BYTES - 1)]
        counting.reads.clear()
        assert markers.acknowledged([(TP, 10, digest), (TP, 11, digest)]) == [False, False]
        assert counting.reads == []  # steady state: no Redis round trip at all

        markers.mark([(TP, 10, digest)])  # this worker's own answers raise the mark it knows
        assert markers.acknowledged([(TP, 10, digest)]) == [True]
        markers.forget(TP)  # the partition left: its mark is read again when it returns
        counting.reads.clear()
        assert markers.acknowledged([(TP, 10, digest)]) == [True]
        assert len(counting.reads) == 2
        markers.close()
        assert PublishedMarkers(cache, settings).acknowledged([(TP, 10, digest)]) == [True]
    finally:
        cache.close()


def test_markers_of_runs_across_blocks_partitions_and_gaps_are_found_and_only_theirs(services, make_settings):
    """Markers are slots in per-partition blocks, written one run of consecutive offsets at a time: runs that
    cross a block boundary, interleave partitions, arrive out of order or leave gaps read back exactly."""
    settings = make_settings()
    cache = VerdictCache(settings.redis)
    other = TopicPartition("chat.events", 3)
    try:
        writer = PublishedMarkers(cache, settings)
        edge = BLOCK_OFFSETS - 2
        marked = [(TP, o, record_digest(b"%d" % o)) for o in (*range(edge, edge + 5), 1, 3, 2)]
        marked += [(other, o, record_digest(b"other %d" % o)) for o in (edge + 1, 7)]
        writer.write_offsets(marked[:4])  # as an intake process does (now, on this thread)
        writer.mark(marked[4:])  # as the loop does (on the markers' thread)
        writer.close()

        markers = PublishedMarkers(cache, settings)
        markers.raise_high([(TP, edge + 4), (other, edge + 1)])
        markers.settle()
        markers.forget(TP)
        markers.forget(other)
        wanted = marked + [
            (TP, 0, record_digest(b"0")),
            (TP, 4, record_digest(b"4")),
            (other, 8, record_digest(b"x")),
        ]
        wanted += [(TP, edge, record_digest(b"not the record marked there"))]
        assert markers.acknowledged(wanted) == [True] * len(marked) + [False] * 4
        markers.close()
    finally:
        cache.close()


def test_a_digest_is_never_the_unwritten_slots_zero_bytes(monkeypatch):
    """A record whose digest came out as zero bytes would read as marked in every unwritten slot."""

    class ZeroHash:
        def __init__(self, data, digest_size):
            self.size = digest_size

        def digest(self):
            return bytes(self.size)

    assert record_digest(b"a") != record_digest(b"b")
    monkeypatch.setattr(published.hashlib, "blake2b", ZeroHash)
    digest = record_digest(b"a record whose digest is zero")
    assert len(digest) == DIGEST_BYTES and digest != bytes(DIGEST_BYTES)
