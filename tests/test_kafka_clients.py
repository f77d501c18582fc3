"""Kafka client configuration from settings, and a consumer group with manual commits on the tansu broker."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaAdminClient
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import load_settings
from worker.stream.kafka_clients import (
    admin_config,
    consumer_config,
    ensure_topics,
    make_consumer,
    make_producer,
    producer_config,
)

# -- configuration mapping (pure) -------------------------------------------------------------------


def test_sasl_ssl_settings_pass_through_with_secrets_unwrapped() -> None:
    settings = load_settings(
        None,
        kafka__bootstrap_servers=["broker-1:9093", "broker-2:9093"],
        kafka__security_protocol="SASL_SSL",
        kafka__sasl_mechanism="SCRAM-SHA-512",
        kafka__sasl_username="moderation",
        kafka__sasl_password="s3cret",
        kafka__ssl_cafile="/etc/kafka/ca.pem",
        kafka__ssl_certfile="/etc/kafka/client.pem",
        kafka__ssl_keyfile="/etc/kafka/client.key",
        kafka__ssl_password="keypass",
    )
    for config in (consumer_config(settings), producer_config(settings), admin_config(settings)):
        assert config["bootstrap_servers"] == ["broker-1:9093", "broker-2:9093"]
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_username"] == "moderation"
        assert config["sasl_plain_password"] == "s3cret"
        assert config["ssl_cafile"] == "/etc/kafka/ca.pem"
        assert config["ssl_certfile"] == "/etc/kafka/client.pem"
        assert config["ssl_keyfile"] == "/etc/kafka/client.key"
        assert config["ssl_password"] == "keypass"
        assert config["ssl_check_hostname"] is True
    # The settings object itself still hides the secrets.
    assert "s3cret" not in str(settings.masked())


def test_plaintext_config_carries_no_security_keys() -> None:
    config = consumer_config(load_settings(None))
    assert config["security_protocol"] == "PLAINTEXT"
    assert not [k for k in config if k.startswith(("sasl_", "ssl_"))]


def test_sasl_without_mechanism_is_a_clear_error() -> None:
    settings = load_settings(None, kafka__security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValueError, match="kafka.sasl_mechanism"):
        consumer_config(settings)


def test_consumer_config_uses_manual_commits_and_group_settings() -> None:
    settings = load_settings(
        None,
        kafka__group_id="guards",
        kafka__auto_offset_reset="earliest",
        kafka__session_timeout_ms=6000,
        kafka__heartbeat_interval_ms=2000,
        kafka__max_poll_interval_ms=120_000,
        kafka__max_poll_records=64,
    )
    config = consumer_config(settings)
    assert config["enable_auto_commit"] is False
    assert config["group_id"] == "guards"
    assert config["auto_offset_reset"] == "earliest"
    assert (config["session_timeout_ms"], config["heartbeat_interval_ms"]) == (6000, 2000)
    assert config["max_poll_interval_ms"] == 120_000
    assert config["max_poll_records"] == 64


def test_producer_config_maps_acks_and_compression_names() -> None:
    config = producer_config(load_settings(None, kafka__linger_ms=7, kafka__batch_size=32_768))
    assert config["acks"] == "all"
    assert config["enable_idempotence"] is True
    assert config["compression_type"] == "lz4"
    assert (config["linger_ms"], config["batch_size"], config["delivery_timeout_ms"]) == (7, 32_768, 120_000)
    uncompressed = producer_config(load_settings(None, kafka__compression_type="none", kafka__acks="1"))
    assert uncompressed["compression_type"] is None
    assert uncompressed["acks"] == 1


# -- against the embedded broker --------------------------------------------------------------------


def _consume(consumer, want: int, timeout_s: float = 30.0) -> list:
    """Poll until ``want`` records arrived (or the deadline passed)."""
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < want and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


@pytest.mark.integration
def test_consumer_group_resumes_from_the_committed_offset(make_settings, kafka_client) -> None:
    settings = make_settings(kafka__max_poll_records=4, kafka__client=kafka_client)
    topic = settings.topics.events
    ensure_topics(settings, [topic], partitions=1)
    tp = TopicPartition(topic, 0)

    producer = make_producer(settings)
    for i in range(10):
        producer.send(
            topic,
            key=f"conv-{i % 3}".encode(),
            value=f"event-{i}".encode(),
            headers=[("event_id", str(i).encode())],
        )
    producer.flush(timeout=30)
    producer.close(timeout=10)

    first = make_consumer(settings, topic)
    try:
        records = _consume(first, want=10)
        assert [r.value for r in records] == [f"event-{i}".encode() for i in range(10)]
        assert records[3].headers == [("event_id", b"3")]
        # Only the first six are "done": commit the next offset to read, as the pipeline does.
        first.commit({tp: OffsetAndMetadata(6, "", -1)})
        assert first.committed(tp) == 6
    finally:
        first.close()

    second = make_consumer(settings, topic)
    try:
        resumed = _consume(second, want=4)
        assert [r.offset for r in resumed] == [6, 7, 8, 9]
        assert [r.value for r in resumed] == [f"event-{i}".encode() for i in range(6, 10)]
    finally:
        second.close()


@pytest.mark.integration
def test_ensure_topics_is_idempotent_and_keeps_existing_partitions(make_settings) -> None:
    settings = make_settings()
    names = [settings.topics.flagged, settings.topics.verdicts, settings.topics.dlq]
    ensure_topics(settings, names, partitions=3)
    ensure_topics(settings, names, partitions=3)  # all exist now: no error
    extra = f"extra.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, [names[0], extra], partitions=4)  # one exists with 3, one is new

    admin = KafkaAdminClient(**admin_config(settings))
    try:
        partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names + [extra])}
    finally:
        admin.close()
    assert partitions == {names[0]: 3, names[1]: 3, names[2]: 3, extra: 4}
