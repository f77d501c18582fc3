"""Both Kafka clients as the pipeline uses them, on the embedded broker: what backpressure relies on."""

from __future__ import annotations

import time

import pytest
from kafka.structs import TopicPartition

from worker.stream.kafka_clients import ensure_topics, make_consumer, make_producer

pytestmark = pytest.mark.integration

RECORDS = 40  # per partition: one batch each, read 5 records a poll


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_a_partition_paused_mid_batch_is_read_to_its_end_once_resumed(make_settings, client) -> None:
    """Pause a partition after part of its batch was returned, read the other to its end, resume: the paused
    one is read to its end. (kafka-python 3 alone would never fetch it again: see ResumingKafkaConsumer.)"""
    settings = make_settings(kafka__client=client, kafka__max_poll_records=5)
    topic = settings.topics.events
    ensure_topics(settings, [topic], partitions=2)
    producer = make_producer(settings, linger_ms=50)
    for i in range(RECORDS):
        for partition in (0, 1):
            producer.send(topic, value=b"record %d" % i, partition=partition)
    producer.flush(timeout=30)
    producer.close(timeout=10)
    consumer = make_consumer(settings, topic)
    read = {0: 0, 1: 0}

    def poll_until(done, what: str, limit_s: float = 30.0) -> None:
        deadline = time.monotonic() + limit_s
        while not done():
            assert time.monotonic() < deadline, f"{what}: read {read}"
            for tp, records in consumer.poll(timeout_ms=100).items():
                read[tp.partition] += len(records)

    try:
        poll_until(lambda: any(read.values()), "first records")
        first = next(p for p, n in read.items() if n)
        assert read[first] < RECORDS, "part of the batch"
        consumer.pause(TopicPartition(topic, first))
        other = 1 - first
        poll_until(lambda: read[other] == RECORDS, "the other partition to its end")
        if client == "kafka-python":
            fetcher = (
                consumer._fetcher
            )  # the case that stalled: the paused partition's records were set aside
            assert TopicPartition(topic, first) in fetcher._paused_partition_records
        consumer.resume(TopicPartition(topic, first))
        poll_until(lambda: read[first] == RECORDS, "the resumed partition to its end")
        assert read == {0: RECORDS, 1: RECORDS}
    finally:
        consumer.close()
