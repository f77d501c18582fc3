"""Published markers against a real Redis: marked records are found, others and look-alikes are not."""

from kafka.structs import TopicPartition

from worker.cache.published import PublishedMarkers, record_digest
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

    def set_raw(self, items, ttl_s):
        return self.cache.set_raw(items, ttl_s)


def test_offsets_above_a_partitions_high_water_mark_are_not_looked_up(services, make_settings):
    settings = make_settings()
    cache = VerdictCache(settings.redis)
    try:
        digest = record_digest(b"r")
        earlier = PublishedMarkers(cache, settings)  # the partition's previous owner
        earlier.mark([(TP, 5, digest), (TP, 7, digest)])
        earlier.mark([(TP, 6, digest)])  # acks out of order: the high-water mark stays 7

        counting = CountingCache(cache)
        markers = PublishedMarkers(counting, settings)  # type: ignore[arg-type]
        replayed = [(TP, offset, digest) for offset in range(5, 10)]
        assert markers.acknowledged(replayed) == [True, True, True, False, False]
        high, lookups = counting.reads
        assert high == [markers._high_key(TP)]
        assert len(lookups) == 3  # offsets 5-7 (at or below 7); 8 and 9 were never answered
        counting.reads.clear()
        assert markers.acknowledged([(TP, 10, digest), (TP, 11, digest)]) == [False, False]
        assert counting.reads == []  # steady state: no Redis round trip at all

        markers.mark([(TP, 10, digest)])  # this worker's own answers raise the mark it knows
        assert markers.acknowledged([(TP, 10, digest)]) == [True]
        markers.forget(TP)  # the partition left: its mark is read again when it returns
        counting.reads.clear()
        assert markers.acknowledged([(TP, 10, digest)]) == [True]
        assert len(counting.reads) == 2
        assert PublishedMarkers(cache, settings).acknowledged([(TP, 10, digest)]) == [True]
    finally:
        cache.close()
