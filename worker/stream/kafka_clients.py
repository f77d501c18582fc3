"""kafka-python consumer, producer and admin clients built from ``settings.kafka``.

One place maps our settings to kafka-python's keyword names, so every part of the worker (stream
pipeline, Ray actors, demo, tests, benchmarks) talks to the broker the same way:

- consumer: our group, **manual commits** (``enable_auto_commit=False``: the pipeline commits only
  completed offsets), ``auto_offset_reset``, session/heartbeat/poll timeouts, ``max_poll_records``;
- producer: ``acks=all`` + idempotence by default, compression, linger, batch size, delivery timeout;
- security: SASL and TLS settings pass through; secrets are unwrapped from ``SecretStr`` only here.

Against the embedded tansu broker: LATEST offset lookups, ``create_partitions`` and
``describe_groups`` are broken, so nothing here relies on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import TopicAlreadyExistsError, for_code

from worker.config import KafkaSettings, Settings

log = logging.getLogger(__name__)

# kafka-python names the "no compression" codec None.
_COMPRESSION = {"none": None, "gzip": "gzip", "lz4": "lz4", "zstd": "zstd"}
# kafka-python wants acks as -1/"all", 0 or 1; our config keeps strings so YAML and env agree.
_ACKS: dict[str, int | str] = {"all": "all", "1": 1, "0": 0}


def _connection_config(kafka: KafkaSettings) -> dict[str, Any]:
    """Keys every kafka-python client shares: where the brokers are and how to reach them securely."""
    config: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
        "retry_backoff_ms": kafka.retry_backoff_ms,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        config.update(
            ssl_cafile=kafka.ssl_cafile,
            ssl_certfile=kafka.ssl_certfile,
            ssl_keyfile=kafka.ssl_keyfile,
            ssl_password=kafka.ssl_password.get_secret_value() if kafka.ssl_password else None,
            ssl_check_hostname=kafka.ssl_check_hostname,
        )
    if kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if kafka.sasl_mechanism is None:
            raise ValueError(
                f"kafka.sasl_mechanism is required with kafka.security_protocol={kafka.security_protocol}"
            )
        config["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism != "OAUTHBEARER":
            # OAUTHBEARER needs a token provider object instead: pass sasl_oauth_token_provider as an override.
            config.update(
                sasl_plain_username=kafka.sasl_username,
                sasl_plain_password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            )
    return config


def consumer_config(settings: Settings) -> dict[str, Any]:
    """kafka-python ``KafkaConsumer`` keyword arguments for the worker's consumer group (manual commits).

    A worker of a pool (split deployment) joins its pool's own group, so every pool reads every event.
    """
    from worker.moderation.routing import consumer_group_id

    kafka = settings.kafka
    return {
        **_connection_config(kafka),
        "group_id": consumer_group_id(settings),
        # The pipeline commits the highest contiguous completed offset itself (at-least-once).
        "enable_auto_commit": False,
        "auto_offset_reset": kafka.auto_offset_reset,
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "max_poll_records": kafka.max_poll_records,
        "fetch_max_bytes": kafka.fetch_max_bytes,
        "max_partition_fetch_bytes": kafka.max_partition_fetch_bytes,
    }


def producer_config(settings: Settings) -> dict[str, Any]:
    """kafka-python ``KafkaProducer`` keyword arguments for verdicts, flagged events and dead letters."""
    kafka = settings.kafka
    return {
        **_connection_config(kafka),
        "acks": _ACKS[kafka.acks],
        "enable_idempotence": kafka.enable_idempotence,
        "compression_type": _COMPRESSION[kafka.compression_type],
        "linger_ms": kafka.linger_ms,
        "batch_size": kafka.batch_size,
        "delivery_timeout_ms": kafka.delivery_timeout_ms,
    }


def admin_config(settings: Settings) -> dict[str, Any]:
    """kafka-python ``KafkaAdminClient`` keyword arguments (connection and security only)."""
    return _connection_config(settings.kafka)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A ``KafkaConsumer`` from :func:`consumer_config`; ``overrides`` win (e.g. ``consumer_timeout_ms``).

    Pass ``topics`` to subscribe at once, or call ``subscribe(..., listener=...)`` yourself.
    """
    return KafkaConsumer(*topics, **{**consumer_config(settings), **overrides})


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A ``KafkaProducer`` from :func:`producer_config`; ``overrides`` win."""
    return KafkaProducer(**{**producer_config(settings), **overrides})


def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = -1,
    timeout_s: float = 10.0,
) -> None:
    """Create the topics in ``names`` that do not exist yet, then wait until they have leaders.

    Idempotent: existing topics (including ones created concurrently by another worker) are left as
    they are; an existing topic with fewer partitions is only logged, because growing it needs
    ``create_partitions``, which tansu does not implement. ``replication_factor=-1`` takes the
    broker's default. Raises ``KafkaError`` for any other failure.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(**admin_config(settings), bootstrap_timeout_ms=timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            response = admin.create_topics(
                {
                    name: {"num_partitions": partitions, "replication_factor": replication_factor}
                    for name in missing
                },
                timeout_ms=timeout_ms,
                raise_errors=False,
            )
            for topic in response["topics"]:
                error = for_code(topic["error_code"])
                if topic["error_code"] != 0 and error is not TopicAlreadyExistsError:
                    raise error(
                        f"creating topic {topic['name']!r}: {topic.get('error_message') or error.__name__}"
                    )
            log.info("created topics %s with %d partition(s)", missing, partitions)
        admin.wait_for_topics(wanted, timeout_ms=timeout_ms)
        for topic in admin.describe_topics(wanted):
            have = len(topic.get("partitions") or [])
            if have < partitions:
                log.warning(
                    "topic %s has %d partition(s), fewer than the %d asked for; left as it is",
                    topic["name"],
                    have,
                    partitions,
                )
    finally:
        admin.close()


__all__ = [
    "admin_config",
    "consumer_config",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "producer_config",
]
