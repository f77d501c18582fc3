"""Kafka consumer, producer and admin clients built from ``settings.kafka``.

One place maps our settings to the client's names, so every part of the worker (stream pipeline, Ray
actors, demo, tests, benchmarks) talks to the broker the same way. ``kafka.client`` chooses the library:
kafka-python (the default) or confluent-kafka, whose adapters (``worker.stream.confluent_clients``)
present the same kafka-python interface, so callers and their keyword overrides do not change:

- consumer: our group, **manual commits** (``enable_auto_commit=False``: the pipeline commits only
  completed offsets), ``auto_offset_reset``, session/heartbeat/poll timeouts, ``max_poll_records``;
- producer: ``acks=all`` + idempotence by default, compression, linger, batch size, delivery timeout,
  and :class:`CachedKeyPartitioner` — kafka-python's default partitioner (the Java client's murmur2 of
  the key) with each key's hash remembered: the pure-Python murmur2 was a tenth of the cache-hit path;
- security: SASL and TLS settings pass through; secrets are unwrapped from ``SecretStr`` only here.

Against the embedded tansu broker: LATEST offset lookups, ``create_partitions`` and
``describe_groups`` are broken, so nothing here relies on them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import TopicAlreadyExistsError, for_code
from kafka.partitioner import DefaultPartitioner
from kafka.partitioner.default import murmur2

from worker.config import KafkaSettings, Settings

if TYPE_CHECKING:
    from worker.stream.confluent_clients import ConfluentConsumer, ConfluentProducer

log = logging.getLogger(__name__)

# kafka-python names the "no compression" codec None.
_COMPRESSION = {"none": None, "gzip": "gzip", "lz4": "lz4", "zstd": "zstd"}
# kafka-python wants acks as -1/"all", 0 or 1; our config keeps strings so YAML and env agree.
_ACKS: dict[str, int | str] = {"all": "all", "1": 1, "0": 0}
_ASSIGNORS = {
    "range": (RangePartitionAssignor,),
    "roundrobin": (RoundRobinPartitionAssignor,),
    "cooperative-sticky": (CooperativeStickyAssignor,),
}
KEY_HASH_CACHE_SIZE = 65_536  # keys whose murmur2 is remembered (≈100 bytes each); cleared when full


class CachedKeyPartitioner(DefaultPartitioner):
    """kafka-python's default partitioner with each key's murmur2 hash computed once.

    Outputs are keyed by ``conversation_id``, and a conversation's events come again and again (a
    cache-hit wave is the same content in the same conversations); the hash is pure Python in
    kafka-python. The choice is exactly ``DefaultPartitioner``'s: ``murmur2(key) & 0x7fffffff`` modulo the
    topic's partition count, over the sorted partition ids; a random available partition when unkeyed.
    """

    def __init__(self, max_keys: int = KEY_HASH_CACHE_SIZE) -> None:
        self._hashes: dict[bytes, int] = {}
        self._max_keys = max_keys

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):  # type: ignore[no-untyped-def]
        """The partition of ``serialized_key`` on ``topic`` (kafka-python's ``Partitioner`` interface)."""
        partitions = cluster.partitions_for_topic(topic)
        if partitions is None:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        if serialized_key is None:
            available = cluster.available_partitions_for_topic(topic)
            return random.choice(list(available or partitions))
        hashed = self._hashes.get(serialized_key)
        if hashed is None:
            if len(self._hashes) >= self._max_keys:
                self._hashes.clear()
            hashed = self._hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        if len(partitions) == max(partitions) + 1:  # ids 0..n-1, the normal case: no sort needed
            return hashed % len(partitions)
        return sorted(partitions)[hashed % len(partitions)]


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
        **(
            {"partition_assignment_strategy": _ASSIGNORS[kafka.partition_assignment_strategy]}
            if kafka.partition_assignment_strategy is not None
            else {}
        ),
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
        "partitioner": CachedKeyPartitioner(),
    }


def admin_config(settings: Settings) -> dict[str, Any]:
    """kafka-python ``KafkaAdminClient`` keyword arguments (connection and security only)."""
    return _connection_config(settings.kafka)


def _confluent() -> Any:
    """The confluent-kafka adapters' module, or a clear error naming the missing extra."""
    try:
        from worker.stream import confluent_clients
    except ImportError as exc:
        raise RuntimeError(
            "kafka.client is confluent-kafka, but the confluent-kafka package is not installed: "
            "pip install 'moderation-worker[confluent]'"
        ) from exc
    return confluent_clients


class ResumingKafkaConsumer(KafkaConsumer):  # type: ignore[misc]
    """kafka-python's ``KafkaConsumer``, with a resumed partition always fetched again.

    kafka-python 3 keeps the parsed records of a partition paused mid-batch aside (its port of KAFKA-7548)
    and excludes that partition from fetches until they are given back, which it does only while its
    in-line slot is ``None``; but a fully read batch stays in that slot (empty, not ``None``) until the next
    partition is parked. So a partition paused mid-batch, after another partition's batch was read to its
    end, is never fetched again once resumed: a silent stall of that partition (backpressure pauses exactly
    so). Before each poll an empty in-line batch is let go, which changes nothing else (the fetcher treats an
    empty batch and ``None`` alike everywhere but there). Where the fetcher has no such attributes (another
    kafka-python version), nothing is done.
    """

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        release_parked_records(getattr(self, "_fetcher", None))
        return super().poll(*args, **kwargs)


def release_parked_records(fetcher: Any) -> None:
    """Let go of an empty in-line batch of kafka-python's fetcher, so parked records of resumed partitions return."""
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> KafkaConsumer | ConfluentConsumer:
    """The consumer of ``kafka.client``, from :func:`consumer_config`; ``overrides`` (kafka-python names) win.

    Pass ``topics`` to subscribe at once, or call ``subscribe(..., listener=...)`` yourself. With
    confluent-kafka the overrides are translated to librdkafka's names (a name without one is an error).
    """
    if settings.kafka.client == "confluent-kafka":
        return _confluent().make_confluent_consumer(settings, *topics, **overrides)
    return ResumingKafkaConsumer(*topics, **{**consumer_config(settings), **overrides})


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer | ConfluentProducer:
    """The producer of ``kafka.client``, from :func:`producer_config`; ``overrides`` (kafka-python names) win."""
    if settings.kafka.client == "confluent-kafka":
        return _confluent().make_confluent_producer(settings, **overrides)
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
    "CachedKeyPartitioner",
    "admin_config",
    "consumer_config",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "producer_config",
]
