"""Publisher delivery reporting: an event is acked once all its records are, or failed on the first error.

Pure logic: the producer here only hands out kafka-python ``Future`` objects, which the test settles
the way kafka-python's I/O thread does (``success`` / ``failure``). Records, headers and keys sent to a
real broker are checked by the end-to-end tests in ``test_pipeline.py``.
"""

from __future__ import annotations

from typing import Any

import orjson
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from worker.config import TopicSettings
from worker.stream.publisher import Publisher


class RecordingProducer:
    """Keeps every send and its future; ``fail_on`` makes ``send`` raise for that topic."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any], Future]] = []
        self.fail_on = fail_on

    def send(self, topic: str, *, value: bytes, key: bytes | None, headers: list) -> Future:
        if topic == self.fail_on:
            raise KafkaTimeoutError("buffer full")
        future = Future()
        self.sent.append((topic, {"key": key, "value": value, "headers": headers}, future))
        return future

    def futures(self, topic: str) -> list[Future]:
        return [f for t, _, f in self.sent if t == topic]


def verdict(event_id: str, *, flagged: bool) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "conversation_id": f"conv-{event_id}",
        "flagged": flagged,
        "policy": {"id": "default", "hash": "abc"},
        "model": {"id": "tiny", "revision": None},
    }


def test_a_safe_verdict_is_acked_when_its_one_record_is():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    publisher.publish(publisher.encoder.verdict(verdict("e1", flagged=False)), "token-1")
    assert publisher.awaiting_acks
    assert publisher.drain_acks() == []
    producer.futures("moderation.verdicts")[0].success(None)
    assert publisher.drain_acks() == [("token-1", None)]
    assert not publisher.awaiting_acks
    assert publisher.drain_acks() == []  # reported once


def test_a_flagged_verdict_waits_for_both_records():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    publisher.publish(publisher.encoder.verdict(verdict("e1", flagged=True)), "token-1")
    assert [t for t, _, _ in producer.sent] == ["moderation.verdicts", "moderation.flagged"]
    producer.futures("moderation.flagged")[0].success(None)
    assert publisher.drain_acks() == []
    producer.futures("moderation.verdicts")[0].success(None)
    assert publisher.drain_acks() == [("token-1", None)]


def test_the_first_failure_is_reported_at_once_and_only_once():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    publisher.publish(publisher.encoder.verdict(verdict("e1", flagged=True)), "token-1")
    error = KafkaTimeoutError("expired")
    producer.futures("moderation.flagged")[0].failure(error)
    [(token, reported)] = publisher.drain_acks()
    assert token == "token-1" and reported is error
    producer.futures("moderation.verdicts")[0].success(None)
    assert publisher.drain_acks() == []


def test_a_send_that_raises_is_reported_as_failed():
    producer = RecordingProducer(fail_on="moderation.flagged")
    publisher = Publisher(producer, TopicSettings())
    publisher.publish(publisher.encoder.verdict(verdict("e1", flagged=True)), "token-1")
    [(token, reported)] = publisher.drain_acks()
    assert token == "token-1" and isinstance(reported, KafkaTimeoutError)


def test_nothing_to_send_is_acked_at_once():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings(publish_all_verdicts=False))
    publisher.publish(publisher.encoder.verdict(verdict("e1", flagged=False)), "token-1")
    assert producer.sent == []
    assert publisher.drain_acks() == [("token-1", None)]


def test_acks_are_reported_per_event_whatever_their_order():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    for i in range(3):
        publisher.publish(publisher.encoder.verdict(verdict(f"e{i}", flagged=False)), f"token-{i}")
    futures = producer.futures("moderation.verdicts")
    futures[2].success(None)
    futures[0].success(None)
    assert sorted(publisher.drain_acks()) == [("token-0", None), ("token-2", None)]
    futures[1].success(None)
    assert publisher.drain_acks() == [("token-1", None)]


def test_verdict_records_carry_key_headers_and_the_verdict():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    for event_id in ("e1", "e2"):  # the second one reuses the encoded policy/model headers
        publisher.publish(publisher.encoder.verdict(verdict(event_id, flagged=False)), event_id)
    _, record, _ = producer.sent[1]
    assert record["key"] == b"conv-e2"
    assert record["headers"] == [
        ("event_id", b"e2"),
        ("schema", b"verdict.v1"),
        ("policy", b"default:abc"),
        ("model", b"tiny@"),
    ]
    assert orjson.loads(record["value"])["event_id"] == "e2"


def test_dead_letters_go_to_the_dlq_with_their_reason():
    producer = RecordingProducer()
    publisher = Publisher(producer, TopicSettings())
    publisher.publish(
        publisher.encoder.dead_letter({"event_id": "e1", "reason": "invalid_json"}, b"k"), "token-1"
    )
    [(topic, record, future)] = producer.sent
    assert topic == "moderation.dlq" and record["key"] == b"k"
    assert record["headers"] == [
        ("event_id", b"e1"),
        ("schema", b"dead_letter.v1"),
        ("reason", b"invalid_json"),
    ]
    future.success(None)
    assert publisher.drain_acks() == [("token-1", None)]
