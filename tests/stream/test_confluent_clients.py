"""The confluent-kafka adapters: configuration mapping, the partitioner, and kafka-python's rebalance semantics
on the embedded broker (kept partitions keep their position and paused flag; see ``worker.stream.offsets``)."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.partitioner import DefaultPartitioner
from kafka.structs import OffsetAndMetadata, TopicPartition

from tests.support import kafka_io
from worker.config import load_settings
from worker.stream.confluent_clients import (
    ConfluentConsumer,
    ConfluentProducer,
    consumer_properties,
    make_confluent_producer,
    producer_properties,
    translate_overrides,
)
from worker.stream.kafka_clients import CachedKeyPartitioner, ensure_topics, make_consumer, make_producer
from worker.stream.publisher import BatchPublisher
from worker.stream.records import Encoder, OutputRecord

# -- configuration mapping (pure) -------------------------------------------------------------------


def test_consumer_properties_commit_manually_and_carry_the_group_settings() -> None:
    settings = load_settings(
        None,
        kafka__bootstrap_servers=["b1:9092", "b2:9092"],
        kafka__group_id="g",
        kafka__session_timeout_ms=7000,
        kafka__partition_assignment_strategy="cooperative-sticky",
    )
    props = consumer_properties(settings)
    assert props["bootstrap.servers"] == "b1:9092,b2:9092"
    assert props["group.id"] == "g"
    assert props["enable.auto.commit"] is False
    assert props["session.timeout.ms"] == 7000
    assert props["partition.assignment.strategy"] == "cooperative-sticky"
    assert "partition.assignment.strategy" not in consumer_properties(load_settings(None))


def test_producer_properties_are_idempotent_acks_all_with_the_configured_codec_and_murmur2() -> None:
    props = producer_properties(load_settings(None, kafka__compression_type="zstd", kafka__linger_ms=3))
    assert props["acks"] == "all" and props["enable.idempotence"] is True
    assert props["compression.type"] == "zstd" and props["linger.ms"] == 3
    assert props["partitioner"] == "murmur2_random"  # the Java client's (and kafka-python's) key hash


def test_tls_and_sasl_settings_map_to_librdkafka_names_with_secrets_unwrapped() -> None:
    settings = load_settings(
        None,
        kafka__security_protocol="SASL_SSL",
        kafka__sasl_mechanism="SCRAM-SHA-512",
        kafka__sasl_username="moderation",
        kafka__sasl_password="s3cret",
        kafka__ssl_cafile="/etc/kafka/ca.pem",
        kafka__ssl_check_hostname=False,
    )
    for props in (consumer_properties(settings), producer_properties(settings)):
        assert props["security.protocol"] == "SASL_SSL"
        assert props["sasl.mechanism"] == "SCRAM-SHA-512"
        assert (props["sasl.username"], props["sasl.password"]) == ("moderation", "s3cret")
        assert props["ssl.ca.location"] == "/etc/kafka/ca.pem"
        assert props["ssl.endpoint.identification.algorithm"] == "none"


def test_kafka_python_overrides_are_renamed_and_an_unknown_one_is_an_error() -> None:
    properties, adapter = translate_overrides(
        {"group_id": "reader", "enable_auto_commit": False, "max_poll_records": 7, "fetch.wait.max.ms": 10}
    )
    assert properties == {"group.id": "reader", "enable.auto.commit": False, "fetch.wait.max.ms": 10}
    assert adapter == {"max_poll_records": 7}
    with pytest.raises(ValueError, match="consumer_timeout_ms"):
        translate_overrides({"consumer_timeout_ms": 100})


class Cluster:
    """The three ``ClusterMetadata`` calls a partitioner makes, for a topic with ``partitions``."""

    def __init__(self, partitions: set[int]) -> None:
        self._partitions = partitions

    def topics(self) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


@given(
    keys=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=50),
    count=st.integers(min_value=1, max_value=64),
)
def test_the_cached_partitioner_chooses_what_kafka_pythons_default_partitioner_chooses(
    keys: list[bytes], count: int
) -> None:
    cached, default = CachedKeyPartitioner(max_keys=16), DefaultPartitioner()
    for cluster in (Cluster(set(range(count))), Cluster({p * 3 + 1 for p in range(count)})):  # gaps too
        for key in keys + keys:  # the second round answers from the cache
            assert cached.partition("t", None, key, None, None, cluster) == default.partition(
                "t", None, key, None, None, cluster
            )


def test_the_cached_partitioner_spreads_unkeyed_records_over_the_partitions() -> None:
    random.seed(5)
    cached = CachedKeyPartitioner()
    chosen = {cached.partition("t", None, None, None, None, Cluster({0, 1, 2})) for _ in range(200)}
    assert chosen == {0, 1, 2}


# -- against the embedded broker --------------------------------------------------------------------


@pytest.mark.integration
def test_keyed_records_land_on_the_same_partitions_with_either_client(make_settings) -> None:
    settings = make_settings()
    topic = settings.topics.verdicts
    ensure_topics(settings, [topic], partitions=5)
    keys = [f"conversation-{i}".encode() for i in range(60)]
    placed: dict[str, dict[bytes, int]] = {}
    for client in ("kafka-python", "confluent-kafka"):
        producer = make_producer(make_settings(kafka__client=client))
        futures = [(key, producer.send(topic, key=key, value=client.encode())) for key in keys]
        producer.flush(timeout=30)
        if isinstance(producer, ConfluentProducer):
            producer.serve_deliveries(0)
        placed[client] = {key: future.get(timeout=10).partition for key, future in futures}
        producer.close(timeout=10)
    assert placed["kafka-python"] == placed["confluent-kafka"]
    assert len(set(placed["kafka-python"].values())) == 5


class Recorder(ConsumerRebalanceListener):
    """Rebalance callbacks in order, with the client's assignment at the time of each."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.calls: list[tuple[str, set[int], set[int]]] = []

    def _record(self, what: str, tps: Any) -> None:
        held = {tp.partition for tp in self.consumer.assignment()}
        self.calls.append((what, {tp.partition for tp in tps}, held))

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._record("revoked", revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._record("assigned", assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self._record("lost", lost)


def _member(settings: Any) -> tuple[ConfluentConsumer, Recorder]:
    consumer = make_consumer(settings)
    assert isinstance(consumer, ConfluentConsumer)
    recorder = Recorder()
    recorder.consumer = consumer
    consumer.subscribe([settings.topics.events], listener=recorder)
    return consumer, recorder


def _poll_until(consumers: list[Any], condition: Any, timeout_s: float, what: str) -> dict[int, list[int]]:
    """Poll every consumer until ``condition()``; returns the offsets the first one received, per partition."""
    received: dict[int, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i, consumer in enumerate(consumers):
            for tp, records in consumer.poll(timeout_ms=100).items():
                if i == 0:
                    received.setdefault(tp.partition, []).extend(r.offset for r in records)
        if condition():
            return received
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_a_kept_partition_keeps_its_position_and_paused_flag_when_a_member_joins(
    make_settings, strategy
) -> None:
    settings = make_settings(
        kafka__client="confluent-kafka",
        kafka__partition_assignment_strategy=strategy,
        kafka__max_poll_records=5,
    )
    topic = settings.topics.events
    ensure_topics(settings, [topic], partitions=4)
    producer = make_producer(settings, linger_ms=0)
    for i in range(200):
        producer.send(topic, value=b"%d" % i, partition=i % 4)
    producer.flush(timeout=30)
    producer.close(timeout=10)

    a, a_calls = _member(settings)
    b = None
    try:
        first = _poll_until([a], lambda: len(a.assignment()) == 4, 60, "A owns all")
        while sum(map(len, first.values())) < 20:
            for tp, records in a.poll(timeout_ms=200).items():
                first.setdefault(tp.partition, []).extend(r.offset for r in records)
        # Nothing committed: a partition that moves to B starts at offset 0 there.
        a.pause(*a.assignment())
        b, b_calls = _member(settings)
        during = _poll_until(
            [a, b],
            lambda: len(a.assignment()) == 2 and len(b.assignment()) == 2,
            90,
            "A and B split the partitions",
        )
        kept = {tp.partition for tp in a.assignment()}
        assert not during, "A received records while its partitions were paused"
        assert {tp.partition for tp in a.paused()} == kept
        if strategy == "range":
            revoked = next(c for c in a_calls.calls if c[0] == "revoked")
            assert revoked[1] == {0, 1, 2, 3} and revoked[2] == {0, 1, 2, 3}  # while still held
            assert a_calls.calls[-1][:2] == ("assigned", kept)  # the full new assignment
        else:
            revoked = next(c for c in a_calls.calls if c[0] == "revoked")
            assert revoked[1] == {0, 1, 2, 3} - kept and not (revoked[2] & revoked[1])  # after the drop
        # Still paused a while later (the flag survived the rebalance in the client, not just in our set).
        quiet: dict[int, list[int]] = {}
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for tp, records in a.poll(timeout_ms=100).items():
                quiet.setdefault(tp.partition, []).extend(r.offset for r in records)
        assert not quiet
        a.resume(*a.assignment())
        after: dict[int, list[int]] = {}
        end = time.monotonic() + 30
        while time.monotonic() < end and sum(len(after.get(p, [])) for p in kept) < 2 * 50 - sum(
            len(first.get(p, [])) for p in kept
        ):
            for tp, records in a.poll(timeout_ms=200).items():
                after.setdefault(tp.partition, []).extend(r.offset for r in records)
        for p in kept:
            # Each kept partition continues exactly after what A had received: nothing again, nothing skipped.
            assert first.get(p, []) + after.get(p, []) == list(range(50)), p
        assert a.highwater(TopicPartition(topic, next(iter(kept)))) is None
        a.commit({TopicPartition(topic, p): OffsetAndMetadata(50, "", -1) for p in kept})
        assert {a.committed(TopicPartition(topic, p)) for p in kept} == {50}
        # B leaves: the partitions A paused before handing them over come back unpaused (librdkafka
        # remembers a paused flag across assignments; kafka-python gives a returning partition a fresh one).
        b.close()
        b = None
        moved = {0, 1, 2, 3} - kept
        back = _poll_until(
            [a],
            lambda: len(a.assignment()) == 4 and not a.paused(),
            90,
            "A owns all again",
        )
        end = time.monotonic() + 30
        while time.monotonic() < end and sum(len(back.get(p, [])) for p in moved) < 50 * len(moved):
            for tp, records in a.poll(timeout_ms=200).items():
                back.setdefault(tp.partition, []).extend(r.offset for r in records)
        for p in moved:
            assert sorted(back.get(p, [])) == list(range(50)), p  # from the committed offset (none: 0)
    finally:
        if b is not None:
            b.close()
        a.close()


@pytest.mark.integration
def test_a_confluent_consumer_reads_what_kafka_python_committed(make_settings) -> None:
    settings = make_settings(kafka__client="confluent-kafka")
    topic = settings.topics.events
    ensure_topics(settings, [topic], partitions=1)
    producer = make_producer(settings)
    for i in range(10):
        producer.send(topic, value=b"%d" % i, headers=[("event_id", b"%d" % i)])
    producer.flush(timeout=30)
    producer.close(timeout=10)
    tp = TopicPartition(topic, 0)
    reader = KafkaConsumer(
        bootstrap_servers=list(settings.kafka.bootstrap_servers),
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    reader.assign([tp])
    reader.commit({tp: OffsetAndMetadata(4, "", -1)})
    reader.close(autocommit=False)
    consumer = make_consumer(settings, topic)
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while len(got) < 6 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
        assert [r.offset for r in got] == [4, 5, 6, 7, 8, 9]
        assert got[0].value == b"4" and got[0].headers == [("event_id", b"4")] and got[0].timestamp > 0
        assert consumer.partitions_for_topic(topic) == {0}
    finally:
        consumer.close()


# -- batches published with failure reports only -----------------------------------------------------------


def _outputs(settings, n: int) -> list[OutputRecord]:
    topics = settings.topics
    return [
        OutputRecord(
            (topics.verdicts, topics.flagged) if i % 3 == 0 else (topics.verdicts,),
            f"c-{i}".encode(),
            orjson.dumps({"event_id": f"e-{i}"}),
            [("event_id", f"e-{i}".encode())],
            f"e-{i}",
        )
        for i in range(n)
    ]


def test_a_batch_published_with_failure_reports_only_is_acknowledged_in_full(make_settings) -> None:
    settings = make_settings(kafka__client="confluent-kafka")
    ensure_topics(settings, [settings.topics.verdicts, settings.topics.flagged], partitions=2)
    producer = make_confluent_producer(settings, reports="errors")
    try:
        batch = BatchPublisher(producer, settings.topics, Encoder(settings.topics))
        outputs = _outputs(settings, 30)
        too_large = outputs[7]._replace(value=b"x" * 2_000_000)  # librdkafka refuses it at once
        for i, output in enumerate(outputs):
            batch.publish(too_large if i == 7 else output, i)
        assert batch.wait(30) == [i for i in range(30) if i != 7], "every other token, in order"
        assert batch.wait(30) == [], "a batch is reported once"
    finally:
        producer.close(timeout=10)
    verdicts = kafka_io.read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"e-{i}" for i in range(30) if i != 7)
    flagged = kafka_io.read_json(settings, settings.topics.flagged)
    assert sorted(v["event_id"] for v in flagged) == sorted(f"e-{i}" for i in range(0, 30, 3) if i != 7)


def test_a_batch_larger_than_the_producer_queue_waits_for_room_and_is_acknowledged_in_full(
    make_settings,
) -> None:
    """The batch sends with librdkafka's own produce; when its queue is full that raises BufferError, and the
    record goes through send_unwatched, which waits for room: nothing is dropped or reported failed."""
    settings = make_settings(kafka__client="confluent-kafka")
    ensure_topics(settings, [settings.topics.verdicts, settings.topics.flagged], partitions=2)
    producer = make_confluent_producer(settings, reports="errors", **{"queue.buffering.max.messages": 4})
    waited = 0
    send_unwatched = producer.send_unwatched

    def counted(*args):
        nonlocal waited
        waited += 1
        send_unwatched(*args)

    producer.send_unwatched = counted  # type: ignore[method-assign]
    try:
        batch = BatchPublisher(producer, settings.topics, Encoder(settings.topics))
        for i, output in enumerate(_outputs(settings, 40)):
            batch.publish(output, i)
        assert waited > 0, "the queue of 4 filled up: some records waited for room"
        assert batch.wait(30) == list(range(40))
    finally:
        producer.close(timeout=10)
    verdicts = kafka_io.read_json(settings, settings.topics.verdicts)
    assert sorted(v["event_id"] for v in verdicts) == sorted(f"e-{i}" for i in range(40))


def test_a_batch_whose_deliveries_fail_is_not_acknowledged(make_settings) -> None:
    from worker.dev.services import free_port

    settings = make_settings(
        kafka__client="confluent-kafka",
        kafka__bootstrap_servers=[f"127.0.0.1:{free_port()}"],  # nothing listens there
        kafka__delivery_timeout_ms=1000,
        kafka__request_timeout_ms=1000,
    )
    producer = make_confluent_producer(settings, reports="errors")
    try:
        batch = BatchPublisher(producer, settings.topics, Encoder(settings.topics))
        for i, output in enumerate(_outputs(settings, 5)):
            batch.publish(output, i)
        assert batch.wait(30) == [], "failures reported by librdkafka: none acknowledged"
    finally:
        producer.close(timeout=1)
