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
