"""confluent-kafka (librdkafka) clients behind the kafka-python interface the stream pipeline uses.

``kafka.client: confluent-kafka`` makes :func:`worker.stream.kafka_clients.make_consumer` and
``make_producer`` return these adapters instead of kafka-python's clients. They speak kafka-python's
vocabulary in and out — ``kafka.structs.TopicPartition`` / ``OffsetAndMetadata``, records with
``.offset .value .key .timestamp .headers``, ``ConsumerRebalanceListener`` callbacks, send futures with
``is_done`` / ``exception`` and callbacks, ``kafka.errors`` exceptions — so the pipeline, the publisher
and the delivery rule above them are the same code for both clients. librdkafka does the network work
in C: fetch parsing, record packing, compression and the key partitioner leave the Python loop.

What is mapped, and why:

- consumer: manual commits (``enable.auto.commit=false``) and every group/fetch setting from
  ``settings.kafka``; ``poll`` is ``consume(max_poll_records)`` grouped per partition. Rebalance
  callbacks run inside ``poll`` on the caller's thread, as kafka-python's do, and keep kafka-python's
  semantics (``worker.stream.offsets`` relies on them):

  * eager protocol (``range``/``roundrobin``): ``on_partitions_revoked(all)`` runs while the client still
    holds them, and ``assignment()`` keeps naming them until the new assignment arrives (kafka-python's
    rejoin completes inside one ``poll``; librdkafka's takes several, and the pipeline must not drop held
    work in between). librdkafka drops its state for every partition, where kafka-python keeps the fetch
    position and the paused flag of each partition that stays. The adapter restores both: it records the
    positions at the revocation and assigns kept partitions at those positions, paused again if they
    were; every other partition starts unpaused (librdkafka would keep an old paused flag). No other
    member owned a kept partition in between (eager assignments are handed out together).
  * cooperative protocol (``cooperative-sticky``): revoked partitions are unassigned *before*
    ``on_partitions_revoked`` (kafka-python runs it after the client dropped them), and
    ``on_partitions_assigned`` names only the added ones; kept partitions are untouched by librdkafka.
  * lost membership: ``on_partitions_lost``, then the client drops them.
  * a commit inside a rebalance callback is made synchronously even when asked as ``commit_async`` —
    librdkafka allows it, and the next owner then starts exactly where this member stopped.

- producer: ``acks``, idempotence, compression, linger, batch size and delivery timeout from
  ``settings.kafka``; keys are partitioned with ``murmur2_random`` (the Java client's murmur2, which is
  kafka-python's default), so a conversation lands on the same partition whichever client wrote it.
  Delivery reports are served on the caller's thread (``serve_deliveries``, ``flush``), never on a
  background thread: the futures change state only where the publisher reads them.
- ``highwater`` returns None: librdkafka's high watermark is wrong on brokers that answer LATEST offset
  lookups wrongly (tansu), and the lag gauge is better absent than false.

The admin work (``ensure_topics``) stays on kafka-python's admin client for both settings.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import confluent_kafka as ck
from kafka import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError
from kafka.producer.future import RecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.config import KafkaSettings, Settings

log = logging.getLogger(__name__)

# librdkafka's names for the kafka-python keyword overrides the worker passes to make_consumer/make_producer.
_RENAMED = {
    "group_id": "group.id",
    "client_id": "client.id",
    "enable_auto_commit": "enable.auto.commit",
    "auto_offset_reset": "auto.offset.reset",
    "session_timeout_ms": "session.timeout.ms",
    "heartbeat_interval_ms": "heartbeat.interval.ms",
    "max_poll_interval_ms": "max.poll.interval.ms",
    "fetch_max_bytes": "fetch.max.bytes",
    "max_partition_fetch_bytes": "max.partition.fetch.bytes",
    "retry_backoff_ms": "retry.backoff.ms",
    "request_timeout_ms": "request.timeout.ms",
    "acks": "acks",
    "enable_idempotence": "enable.idempotence",
    "compression_type": "compression.type",
    "linger_ms": "linger.ms",
    "batch_size": "batch.size",
    "delivery_timeout_ms": "delivery.timeout.ms",
}
# kafka-python settings that are the adapter's own (not librdkafka properties).
_ADAPTER_KEYS = frozenset({"max_poll_records", "max_block_ms"})
DEFAULT_MAX_BLOCK_MS = 60_000  # kafka-python's default wait for buffer space and metadata
_MAX_MESSAGES_PER_CONSUME = 1_000_000  # librdkafka's own limit for one consume() call


def _connection_config(kafka: KafkaSettings) -> dict[str, Any]:
    """librdkafka properties every client shares: brokers, client id, security."""
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(kafka.bootstrap_servers),
        "client.id": kafka.client_id,
        "security.protocol": kafka.security_protocol,
        "retry.backoff.ms": kafka.retry_backoff_ms,
        # librdkafka's log lines go through Python logging (JSON lines) instead of raw stderr.
        "logger": logging.getLogger("worker.stream.librdkafka"),
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        tls = {
            "ssl.ca.location": kafka.ssl_cafile,
            "ssl.certificate.location": kafka.ssl_certfile,
            "ssl.key.location": kafka.ssl_keyfile,
            "ssl.key.password": kafka.ssl_password.get_secret_value() if kafka.ssl_password else None,
        }
        config.update({k: v for k, v in tls.items() if v is not None})
        config["ssl.endpoint.identification.algorithm"] = "https" if kafka.ssl_check_hostname else "none"
    if kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        if kafka.sasl_mechanism is None:
            raise ValueError(
                f"kafka.sasl_mechanism is required with kafka.security_protocol={kafka.security_protocol}"
            )
        config["sasl.mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism != "OAUTHBEARER":
            # OAUTHBEARER needs librdkafka's oauthbearer settings (or an oauth_cb): pass them as overrides.
            config["sasl.username"] = kafka.sasl_username
            config["sasl.password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return config


def consumer_properties(settings: Settings) -> dict[str, Any]:
    """librdkafka properties of the worker's consumer: its group, manual commits, group and fetch tuning."""
    from worker.moderation.routing import consumer_group_id

    kafka = settings.kafka
    config = {
        **_connection_config(kafka),
        "group.id": consumer_group_id(settings),
        # The pipeline commits the highest contiguous completed offset itself (at-least-once).
        "enable.auto.commit": False,
        "auto.offset.reset": kafka.auto_offset_reset,
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        "max.poll.interval.ms": kafka.max_poll_interval_ms,
        "fetch.max.bytes": kafka.fetch_max_bytes,
        "max.partition.fetch.bytes": kafka.max_partition_fetch_bytes,
        "socket.timeout.ms": kafka.request_timeout_ms,
    }
    if kafka.partition_assignment_strategy is not None:
        config["partition.assignment.strategy"] = kafka.partition_assignment_strategy
    return config


def producer_properties(settings: Settings) -> dict[str, Any]:
    """librdkafka properties of the output producer (acks, idempotence, compression, batching)."""
    kafka = settings.kafka
    return {
        **_connection_config(kafka),
        "acks": kafka.acks,
        "enable.idempotence": kafka.enable_idempotence,
        "compression.type": kafka.compression_type,
        "linger.ms": kafka.linger_ms,
        "batch.size": kafka.batch_size,
        "delivery.timeout.ms": kafka.delivery_timeout_ms,
        "request.timeout.ms": kafka.request_timeout_ms,
        # The Java client's murmur2 for keyed records (kafka-python's default too); random when unkeyed.
        "partitioner": "murmur2_random",
    }


def translate_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split kafka-python keyword overrides into (librdkafka properties, adapter settings).

    librdkafka property names (with dots) pass through; a kafka-python name without a librdkafka
    counterpart is an error naming it, rather than a setting silently ignored.
    """
    properties: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in _ADAPTER_KEYS:
            adapter[name] = value
        elif "." in name:
            properties[name] = value
        elif name in _RENAMED:
            properties[_RENAMED[name]] = value
        else:
            raise ValueError(f"kafka setting {name!r} has no confluent-kafka counterpart")
    if properties.get("group.id", "") is None:
        properties.pop("group.id")
    return properties, adapter


def _kafka_error(error: ck.KafkaError | ck.KafkaException | None, what: str) -> KafkaError:
    """A ``kafka.errors`` exception for a librdkafka error (so callers catch one family)."""
    if isinstance(error, ck.KafkaException):
        error = error.args[0] if error.args else None
    if isinstance(error, ck.KafkaError):
        name = error.name()
        if error.code() in (
            ck.KafkaError._TIMED_OUT,
            ck.KafkaError.REQUEST_TIMED_OUT,
            ck.KafkaError._MSG_TIMED_OUT,
        ):
            return KafkaTimeoutError(f"{what}: {name}: {error.str()}")
        if what == "commit":
            return CommitFailedError(f"{name}: {error.str()}")
        return KafkaError(f"{what}: {name}: {error.str()}")
    return KafkaError(f"{what}: {error}")


class Record:
    """One consumed record, with the attributes of kafka-python's ``ConsumerRecord`` the worker reads."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.headers = headers

    def __repr__(self) -> str:
        return f"Record({self.topic}-{self.partition}@{self.offset})"


class ConfluentConsumer:
    """A confluent-kafka ``Consumer`` presenting the ``KafkaConsumer`` methods the worker calls."""

    # librdkafka drops the records it prefetched for a partition when it is paused, and fetches them again on
    # the resume (0.5–1 s on a tansu broker): the pipeline holds back before it pauses (``Partitions.regulate``).
    purges_on_pause = True

    def __init__(
        self, properties: dict[str, Any], *topics: str, max_poll_records: int = 500, **_: Any
    ) -> None:
        self._max_records = max(1, min(max_poll_records, _MAX_MESSAGES_PER_CONSUME))
        self._cooperative = "cooperative" in str(properties.get("partition.assignment.strategy", ""))
        self._consumer = ck.Consumer({**properties, "on_commit": self._on_commit})
        self._tps: dict[tuple[str, int], TopicPartition] = {}
        self._assignment: set[TopicPartition] = set()  # what the worker is told it holds
        self._live: set[TopicPartition] = set()  # what librdkafka has assigned (differs mid eager rebalance)
        self._paused: set[TopicPartition] = set()
        self._listener: ConsumerRebalanceListener | None = None
        self._in_rebalance = False
        # Eager protocol: the fetch positions at the last revocation, restored for partitions kept.
        self._revoked_positions: dict[TopicPartition, int] = {}
        self._closed = False
        if topics:
            self.subscribe(list(topics))

    # -- conversions ----------------------------------------------------------------------------------

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        key = (topic, partition)
        tp = self._tps.get(key)
        if tp is None:
            tp = self._tps[key] = TopicPartition(topic, partition)
        return tp

    def _from_ck(self, partitions: Iterable[ck.TopicPartition]) -> set[TopicPartition]:
        return {self._tp(p.topic, p.partition) for p in partitions}

    @staticmethod
    def _to_ck(tps: Iterable[TopicPartition]) -> list[ck.TopicPartition]:
        return [ck.TopicPartition(tp.topic, tp.partition) for tp in tps]

    # -- subscription and rebalance -------------------------------------------------------------------

    def subscribe(
        self, topics: list[str] | tuple[str, ...], listener: ConsumerRebalanceListener | None = None
    ) -> None:
        """Join the group on ``topics``; ``listener`` gets kafka-python's rebalance callbacks."""
        self._listener = listener
        self._consumer.subscribe(
            list(topics), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def _assigned(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        added = self._from_ck(partitions)
        self._in_rebalance = True
        try:
            if self._cooperative:
                consumer.incremental_assign(partitions)
                # librdkafka remembers a partition's paused flag across unassign/assign; a partition
                # that comes back starts unpaused, as with kafka-python.
                consumer.resume(partitions)
                self._assignment |= added
                self._live |= added
                self._paused -= added
            else:
                kept = self._revoked_positions
                consumer.assign(
                    [
                        ck.TopicPartition(
                            p.topic, p.partition, kept.get(self._tp(p.topic, p.partition), ck.OFFSET_INVALID)
                        )
                        for p in partitions
                    ]
                )
                self._assignment, self._live = set(added), set(added)
                # Kept partitions stay paused, as kafka-python keeps their flag; every other one starts
                # unpaused (librdkafka would otherwise keep a paused flag from an earlier assignment).
                self._paused &= added
                if self._paused:
                    consumer.pause(self._to_ck(self._paused))
                unpaused = added - self._paused
                if unpaused:
                    consumer.resume(self._to_ck(unpaused))
                self._revoked_positions = {}
            if self._listener is not None:
                self._listener.on_partitions_assigned(added)
        finally:
            self._in_rebalance = False

    def _revoked(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        revoked = self._from_ck(partitions)
        self._in_rebalance = True
        try:
            if self._cooperative:
                consumer.incremental_unassign(partitions)
                self._assignment -= revoked
                self._live -= revoked
                self._paused -= revoked
                if self._listener is not None:
                    self._listener.on_partitions_revoked(revoked)
                return
            # Eager: until the new assignment arrives the partitions count as held (kafka-python keeps
            # them until the join completes), so the pipeline keeps their in-flight work meanwhile.
            live = list(self._live)
            positions = consumer.position(self._to_ck(live)) if live else []
            self._revoked_positions = {
                self._tp(p.topic, p.partition): p.offset for p in positions if p.offset >= 0
            }
            if self._listener is not None:
                self._listener.on_partitions_revoked(revoked)
            consumer.unassign()
            self._live = set()
        finally:
            self._in_rebalance = False

    def _lost(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        lost = self._from_ck(partitions)
        self._in_rebalance = True
        try:
            if self._listener is not None:
                self._listener.on_partitions_lost(lost)
            if self._cooperative:
                consumer.incremental_unassign(partitions)
                self._assignment -= lost
                self._live -= lost
            else:
                consumer.unassign()
                self._assignment, self._live = set(), set()
            self._paused &= self._assignment
            self._revoked_positions = {}  # another member may have moved on: start from the committed offsets
        finally:
            self._in_rebalance = False

    # -- fetching -------------------------------------------------------------------------------------

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, **_: Any
    ) -> dict[TopicPartition, list[Record]]:
        """Up to ``max_poll_records`` records, grouped by partition; rebalance callbacks run in here."""
        messages = self._consumer.consume(max_records or self._max_records, timeout_ms / 1000.0)
        if not messages:
            return {}
        out: dict[TopicPartition, list[Record]] = {}
        tps = self._tps
        last_key: tuple[str, int] | None = None
        batch: list[Record] = []
        for m in messages:
            if m.error() is not None:
                self._message_error(m.error())
                continue
            topic, partition = m.topic(), m.partition()
            key = (topic, partition)
            if key != last_key:
                tp = tps.get(key) or self._tp(topic, partition)
                batch = out.get(tp) or out.setdefault(tp, [])
                last_key = key
            batch.append(
                Record(topic, partition, m.offset(), m.timestamp()[1], m.key(), m.value(), m.headers() or [])
            )
        return out

    @staticmethod
    def _message_error(error: ck.KafkaError) -> None:
        if error.fatal():
            raise _kafka_error(error, "consume")
        # Transient (broker down, unknown topic while it is being created): librdkafka retries by itself.
        log.debug("consumer error: %s", error.name(), extra={"stage": "consume"})

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop fetching ``partitions`` (backpressure); records already returned stay valid."""
        self._paused.update(partitions)
        live = [tp for tp in partitions if tp in self._live]
        if live:
            self._consumer.pause(self._to_ck(live))

    def resume(self, *partitions: TopicPartition) -> None:
        """Fetch ``partitions`` again."""
        self._paused.difference_update(partitions)
        live = [tp for tp in partitions if tp in self._live]
        if live:
            self._consumer.resume(self._to_ck(live))

    def paused(self) -> set[TopicPartition]:
        """The partitions paused by :meth:`pause` (and kept paused across an eager rebalance)."""
        return set(self._paused)

    def assignment(self) -> set[TopicPartition]:
        """The partitions this client holds (what kafka-python's ``assignment()`` would say)."""
        return set(self._assignment)

    def highwater(self, partition: TopicPartition) -> int | None:
        """Always None: librdkafka's high watermark is not trustworthy on every broker (see the module)."""
        return None

    def position(self, partition: TopicPartition) -> int | None:
        """The offset of the next record to be returned for ``partition`` (None before the first one)."""
        [p] = self._consumer.position(self._to_ck([partition]))
        return p.offset if p.offset >= 0 else None

    # -- offsets --------------------------------------------------------------------------------------

    @staticmethod
    def _offsets(offsets: dict[TopicPartition, OffsetAndMetadata]) -> list[ck.TopicPartition]:
        return [
            ck.TopicPartition(tp.topic, tp.partition, om.offset, om.metadata)
            if om.metadata
            else ck.TopicPartition(tp.topic, tp.partition, om.offset)
            for tp, om in offsets.items()
        ]

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None) -> None:
        """Commit ``offsets`` and wait for the coordinator; raises ``CommitFailedError`` when refused."""
        if offsets is not None and not offsets:
            return
        try:
            if offsets is None:
                result = self._consumer.commit(asynchronous=False)
            else:
                result = self._consumer.commit(offsets=self._offsets(offsets), asynchronous=False)
        except ck.KafkaException as exc:
            raise _kafka_error(exc, "commit") from exc
        for p in result or ():
            if p.error is not None:
                raise _kafka_error(p.error, "commit")

    def commit_async(self, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None) -> None:
        """Commit ``offsets`` without waiting (synchronously inside a rebalance callback: see the module)."""
        if offsets is not None and not offsets:
            return
        if self._in_rebalance:
            try:
                self.commit(offsets)
            except KafkaError as exc:
                log.warning("commit during a rebalance failed: %s", exc, extra={"stage": "commit"})
            return
        try:
            if offsets is None:
                self._consumer.commit(asynchronous=True)
            else:
                self._consumer.commit(offsets=self._offsets(offsets), asynchronous=True)
        except ck.KafkaException as exc:
            raise _kafka_error(exc, "commit") from exc

    @staticmethod
    def _on_commit(error: ck.KafkaError | None, partitions: list[ck.TopicPartition]) -> None:
        if error is not None and error.code() != ck.KafkaError._NO_OFFSET:
            log.warning("asynchronous commit failed: %s", error.name(), extra={"stage": "commit"})

    def committed(self, partition: TopicPartition, timeout_s: float = 10.0) -> int | None:
        """The group's committed offset of ``partition`` (None when it has none)."""
        try:
            [p] = self._consumer.committed(self._to_ck([partition]), timeout=timeout_s)
        except ck.KafkaException as exc:
            raise _kafka_error(exc, "committed") from exc
        return p.offset if p.offset >= 0 else None

    def partitions_for_topic(self, topic: str, timeout_s: float = 10.0) -> set[int] | None:
        """The partition ids of ``topic`` (None when the broker does not know it)."""
        try:
            metadata = self._consumer.list_topics(topic, timeout=timeout_s)
        except ck.KafkaException as exc:
            raise _kafka_error(exc, "metadata") from exc
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        return set(found.partitions)

    def close(self, autocommit: bool = False, **_: Any) -> None:
        """Leave the group (the listener sees the revocation, as with kafka-python) and close.

        Never commits by itself: ``enable.auto.commit`` is off, whatever ``autocommit`` says.
        """
        if self._closed:
            return
        self._closed = True
        self._consumer.close()


class DeliveryFuture:
    """A send's future: settled by librdkafka's delivery report, on the thread that serves the reports.

    kafka-python's ``Future`` interface (``is_done``, ``value``, ``exception``, ``succeeded``, ``failed``,
    ``add_callback``, ``add_errback``, ``get``) without its lock: reports are served by ``poll``/``flush``
    on the caller's thread, so nothing else touches a future while it settles (and a lock per record was
    a measurable share of the cache-hit path).
    """

    __slots__ = ("is_done", "value", "exception", "_callbacks", "_errbacks", "_producer")

    def __init__(self, producer: ConfluentProducer) -> None:
        self.is_done = False
        self.value: Any = None
        self.exception: BaseException | None = None
        self._callbacks: list[Any] | None = None
        self._errbacks: list[Any] | None = None
        self._producer = producer

    def delivered(self, error: ck.KafkaError | None, message: ck.Message) -> None:
        """librdkafka's ``on_delivery`` callback."""
        if error is not None:
            self.exception = _kafka_error(error, "delivery")
            self.is_done = True
            for errback in self._errbacks or ():
                errback(self.exception)
        else:
            self.value = message
            self.is_done = True
            if self._callbacks:
                metadata = self.metadata()
                for callback in self._callbacks:
                    callback(metadata)
        self._callbacks = self._errbacks = None

    def metadata(self) -> RecordMetadata:
        """kafka-python's ``RecordMetadata`` of the acknowledged record."""
        message = self.value
        if isinstance(message, RecordMetadata) or message is None:
            return message
        topic, partition = message.topic(), message.partition()
        self.value = RecordMetadata(
            topic,
            partition,
            TopicPartition(topic, partition),
            message.offset(),
            message.timestamp()[1],
            None,
            len(message.key() or b""),
            len(message.value() or b""),
            -1,
        )
        return self.value

    def succeeded(self) -> bool:
        """Acknowledged by the broker."""
        return self.is_done and self.exception is None

    def failed(self) -> bool:
        """Settled with an error."""
        return self.is_done and self.exception is not None

    def add_callback(self, f: Any, *args: Any, **kwargs: Any) -> DeliveryFuture:
        """Call ``f(*args, metadata, **kwargs)`` on success (at once if already acknowledged)."""
        call = functools.partial(f, *args, **kwargs) if args or kwargs else f
        if not self.is_done:
            self._callbacks = [*(self._callbacks or []), call]
        elif self.exception is None:
            call(self.metadata())
        return self

    def add_errback(self, f: Any, *args: Any, **kwargs: Any) -> DeliveryFuture:
        """Call ``f(*args, error, **kwargs)`` on failure (at once if already failed)."""
        call = functools.partial(f, *args, **kwargs) if args or kwargs else f
        if not self.is_done:
            self._errbacks = [*(self._errbacks or []), call]
        elif self.exception is not None:
            call(self.exception)
        return self

    def get(self, timeout: float | None = None) -> RecordMetadata:
        """Wait for the delivery report (serving reports meanwhile); the record's metadata, or raise its error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_done:
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                raise KafkaTimeoutError(f"no delivery report within {timeout}s")
            self._producer.serve_deliveries(left)
        if self.exception is not None:
            raise self.exception
        return self.metadata()


class ConfluentProducer:
    """A confluent-kafka ``Producer`` presenting the ``KafkaProducer`` methods the worker calls."""

    def __init__(
        self, properties: dict[str, Any], *, max_block_ms: int = DEFAULT_MAX_BLOCK_MS, **_: Any
    ) -> None:
        self._producer = ck.Producer(properties)
        self._max_block_s = max_block_ms / 1000.0
        self._closed = False

    def unwatched_sender(self) -> Callable[..., None]:
        """librdkafka's own ``produce(topic, value, key, on_delivery=..., headers=...)``, for a loop that sends
        many records unwatched: two Python calls fewer per record than ``send_unwatched`` (about 1 µs of a 4.7 µs
        send, measured). It raises ``BufferError`` when librdkafka's queue is full (``send_unwatched`` then waits
        for room) and ``KafkaException`` for a record it refuses; check ``closed`` before using it."""
        return self._producer.produce  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (sends are refused)."""
        return self._closed

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> DeliveryFuture:
        """Queue one record; the returned future settles when its delivery report is served.

        Waits up to ``max_block_ms`` for room when librdkafka's queue is full (kafka-python blocks the
        same way), then raises ``KafkaTimeoutError``.
        """
        if self._closed:
            raise KafkaError("send on a closed producer")
        future = DeliveryFuture(self)
        if partition is None and not timestamp_ms:  # the publisher's case: librdkafka partitions
            self._produce(topic, value, key, on_delivery=future.delivered, headers=headers)
        else:
            self._produce(
                topic,
                value,
                key,
                -1 if partition is None else partition,
                on_delivery=future.delivered,
                timestamp=timestamp_ms or 0,
                headers=headers,
            )
        return future

    def send_unwatched(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        on_failure: Callable[[ck.KafkaError | None, ck.Message], None],
    ) -> None:
        """Queue one record without a future: ``on_failure`` runs (in ``poll``/``flush``) if it is not delivered.

        For a producer made with ``delivery.report.only.error`` (``make_confluent_producer(..., reports="errors")``):
        librdkafka then reports failures only, and a delivered record costs no Python at all. Waits for room
        like ``send``.
        """
        if self._closed:
            raise KafkaError("send on a closed producer")
        self._produce(topic, value, key, on_delivery=on_failure, headers=headers)

    def _produce(self, *args: Any, **kwargs: Any) -> None:
        """librdkafka's ``produce``, waiting up to ``max_block_ms`` for room when its queue is full (kafka-python
        blocks the same way), then ``KafkaTimeoutError``."""
        deadline = None
        while True:
            try:
                self._producer.produce(*args, **kwargs)
                return
            except BufferError:
                deadline = deadline or time.monotonic() + self._max_block_s
                if time.monotonic() >= deadline:
                    raise KafkaTimeoutError(
                        f"the producer queue stayed full for {self._max_block_s:.0f}s"
                    ) from None
                self._producer.poll(0.05)  # serve delivery reports: that is what frees room
            except ck.KafkaException as exc:
                raise _kafka_error(exc, "send") from exc

    def serve_deliveries(self, timeout_s: float = 0.0) -> int:
        """Run the delivery reports that arrived (settling their futures) on this thread; returns how many."""
        return self._producer.poll(timeout_s)

    def idle(self) -> bool:
        """Whether every record sent so far has its answer from the broker, without waiting (the delivery
        reports that arrived are served first)."""
        self._producer.poll(0)
        return len(self._producer) == 0

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued and wait for its delivery reports; ``KafkaTimeoutError`` if some are left."""
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records still awaiting delivery after {timeout}s")

    def partitions_for(self, topic: str) -> set[int]:
        """The partition ids of ``topic``, waiting up to ``max_block_ms`` for the broker to know it."""
        deadline = time.monotonic() + self._max_block_s
        while True:
            try:
                metadata = self._producer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
            except ck.KafkaException as exc:
                raise _kafka_error(exc, "metadata") from exc
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return set(found.partitions)
            if time.monotonic() >= deadline:
                raise KafkaTimeoutError(f"no metadata for topic {topic!r} within {self._max_block_s:.0f}s")
            time.sleep(0.1)

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued (up to ``timeout``) and refuse further sends."""
        if self._closed:
            return
        self._closed = True
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            log.warning("producer closed with %d records undelivered", left, extra={"stage": "publish"})


def make_confluent_consumer(settings: Settings, *topics: str, **overrides: Any) -> ConfluentConsumer:
    """A :class:`ConfluentConsumer` from :func:`consumer_properties`; kafka-python-named ``overrides`` win."""
    properties, adapter = translate_overrides(overrides)
    return ConfluentConsumer(
        {**consumer_properties(settings), **properties},
        *topics,
        max_poll_records=adapter.get("max_poll_records", settings.kafka.max_poll_records),
    )


def make_confluent_producer(
    settings: Settings, *, reports: str = "all", **overrides: Any
) -> ConfluentProducer:
    """A :class:`ConfluentProducer` from :func:`producer_properties`; kafka-python-named ``overrides`` win.

    ``reports="errors"``: librdkafka reports failed deliveries only (``delivery.report.only.error``), for a
    producer that sends with ``send_unwatched`` alone and waits with ``flush`` (``send``'s futures would never
    settle on success).
    """
    properties, adapter = translate_overrides(overrides)
    if reports == "errors":
        properties["delivery.report.only.error"] = True
    elif reports != "all":
        raise ValueError(f"reports must be 'all' or 'errors', not {reports!r}")
    return ConfluentProducer(
        {**producer_properties(settings), **properties},
        max_block_ms=adapter.get("max_block_ms", DEFAULT_MAX_BLOCK_MS),
    )


__all__ = [
    "ConfluentConsumer",
    "ConfluentProducer",
    "DeliveryFuture",
    "Record",
    "consumer_properties",
    "make_confluent_consumer",
    "make_confluent_producer",
    "producer_properties",
    "translate_overrides",
]
