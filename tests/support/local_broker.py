"""An in-memory Kafka broker for the stream's logic tests (the idea of arroyo's ``LocalBroker``).

``LocalBroker`` holds topics (lists of records per partition) and committed offsets per group, and hands
out clients with exactly the kafka-python surface the pipeline uses — so ``StreamPipeline`` runs on it
unchanged, in milliseconds, with no server:

- ``LocalConsumer``: ``subscribe(topics, listener=)``, ``poll(timeout_ms)`` →
  ``{TopicPartition: [ConsumerRecord]}``, ``pause``/``resume``/``paused``/``assignment``, ``commit`` /
  ``commit_async`` / ``committed``, ``highwater``, ``close``. Rebalance callbacks run inside ``poll``, on
  the caller's thread, as kafka-python runs them.
- ``LocalProducer``: ``send(topic, value=, key=, headers=, partition=)`` → a ``kafka.future.Future``
  (``add_callback``/``add_errback``, ``is_done``), ``flush``, ``partitions_for``, ``close``. A record is
  appended to its topic when its send is acknowledged.

Controls for tests: ``rebalance(consumer, partitions, protocol=...)`` (eager: revoke all, then assign
the full new set; cooperative: revoke only the ones that leave, assign only the added ones; ``lost``:
membership lost, everything dropped), ``fail_sends(n)`` / ``refuse_sends(n)`` (the next n acks fail, or
``send`` itself raises), ``hold_acks()`` / ``release_acks()`` (sends stay un-acknowledged until released),
``fail_commits(n)``, ``commits`` (every commit made, in order) and ``produce(...)`` to inject input records.

What it does not model: fetch sessions, leader epochs, transactions, consumer-group coordination between
processes (membership and assignment are what the test says).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaTimeoutError
from kafka.future import Future
from kafka.producer.future import RecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

IDLE_SLEEP_S = 0.001  # an empty poll waits at most this long: nothing arrives while the test thread waits


@dataclass(frozen=True)
class Commit:
    """One commit a consumer made: its group, the offsets, and whether it was ``commit_async``."""

    group: str
    offsets: dict[TopicPartition, int]
    asynchronous: bool


@dataclass
class _Pending:
    """A send the broker has not answered yet (``hold_acks``)."""

    topic: str
    partition: int
    record: ConsumerRecord
    future: Future


class LocalBroker:
    """Topics, committed offsets and the controls a test drives; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.topics: dict[str, list[list[ConsumerRecord]]] = {}
        self._committed: dict[tuple[str, TopicPartition], int] = {}
        self.commits: list[Commit] = []
        self._fail_sends = 0
        self._refuse_sends = 0
        self._fail_commits = 0
        self._holding = False
        self._held: list[_Pending] = []
        self.consumers: list[LocalConsumer] = []
        self.producers: list[LocalProducer] = []

    # -- topics and records -----------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create ``name`` with ``partitions`` empty partitions (idempotent; never shrinks)."""
        with self._lock:
            have = self.topics.setdefault(name, [])
            while len(have) < partitions:
                have.append([])

    def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int = 0,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> int:
        """Append one input record (as an upstream producer would); returns its offset."""
        with self._lock:
            self.create_topic(topic, partition + 1)
            records = self.topics[topic][partition]
            offset = len(records)
            records.append(_record(topic, partition, offset, key, value, headers, timestamp_ms))
            return offset

    def records(self, topic: str) -> list[ConsumerRecord]:
        """Every record in ``topic``, partition by partition."""
        with self._lock:
            return [r for part in self.topics.get(topic, []) for r in part]

    def values(self, topic: str) -> list[Any]:
        """The orjson-decoded values of every record in ``topic``."""
        import orjson

        return [orjson.loads(r.value) for r in self.records(topic)]

    def partitions(self, topic: str) -> list[TopicPartition]:
        """The partitions of ``topic``."""
        with self._lock:
            return [TopicPartition(topic, p) for p in range(len(self.topics.get(topic, [])))]

    def end_offset(self, tp: TopicPartition) -> int:
        """The high-water mark of ``tp``."""
        with self._lock:
            parts = self.topics.get(tp.topic, [])
            return len(parts[tp.partition]) if tp.partition < len(parts) else 0

    # -- groups -----------------------------------------------------------------------------------

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        """The committed offset of ``group`` on ``tp`` (None if never committed)."""
        with self._lock:
            return self._committed.get((group, tp))

    def _commit(self, group: str, offsets: dict[TopicPartition, Any], *, asynchronous: bool) -> None:
        with self._lock:
            if self._fail_commits:
                self._fail_commits -= 1
                raise CommitFailedError("local broker: commit refused (test control)")
            plain = {
                tp: om.offset if isinstance(om, OffsetAndMetadata) else int(om) for tp, om in offsets.items()
            }
            self._committed.update({(group, tp): off for tp, off in plain.items()})
            self.commits.append(Commit(group, plain, asynchronous))

    # -- controls ---------------------------------------------------------------------------------

    def fail_sends(self, n: int, *, error: type[Exception] = KafkaTimeoutError) -> None:
        """The next ``n`` sends are answered with ``error`` (the broker rejected them)."""
        with self._lock:
            self._fail_sends = n
            self._send_error = error

    def refuse_sends(self, n: int) -> None:
        """The next ``n`` calls to ``send`` raise at once (buffer full / broker unreachable)."""
        with self._lock:
            self._refuse_sends = n

    def hold_acks(self) -> None:
        """From now on sends stay unanswered until :meth:`release_acks`."""
        with self._lock:
            self._holding = True

    def release_acks(self, *, fail: bool = False) -> int:
        """Answer every held send (acknowledge, or fail with a timeout when ``fail``); stop holding."""
        with self._lock:
            held, self._held, self._holding = self._held, [], False
        for pending in held:
            if fail:
                pending.future.failure(KafkaTimeoutError("local broker: delivery timed out (test control)"))
            else:
                self._ack(pending)
        return len(held)

    @property
    def unacknowledged(self) -> int:
        """Sends waiting for an answer."""
        with self._lock:
            return len(self._held)

    def fail_commits(self, n: int) -> None:
        """The next ``n`` commits raise ``CommitFailedError`` (e.g. a rebalance under way)."""
        with self._lock:
            self._fail_commits = n

    def rebalance(
        self,
        consumer: LocalConsumer,
        partitions: Iterable[TopicPartition],
        *,
        protocol: str = "eager",
        rejoin_s: float = 0.0,
    ) -> None:
        """Give ``consumer`` exactly ``partitions`` at its next ``poll`` (``eager``, ``cooperative`` or ``lost``).

        ``rejoin_s`` (eager): the revoke runs at the next poll, the assignment at the first poll ``rejoin_s``
        later; the polls in between return nothing (a join that takes several polls, as librdkafka's does,
        and kafka-python's when the coordinator holds the join longer than the poll's timeout).
        """
        if protocol not in ("eager", "cooperative", "lost"):
            raise ValueError(f"unknown rebalance protocol {protocol!r}")
        if rejoin_s and protocol != "eager":
            raise ValueError("only an eager rebalance revokes before the rejoin")
        consumer._pending_rebalance = (set(partitions), protocol)
        consumer._rejoin_s = rejoin_s

    # -- clients ----------------------------------------------------------------------------------

    def consumer(self, group: str = "local-group", *, max_poll_records: int = 500) -> LocalConsumer:
        """A consumer in ``group`` (auto_offset_reset=earliest)."""
        consumer = LocalConsumer(self, group, max_poll_records)
        self.consumers.append(consumer)
        return consumer

    def producer(self) -> LocalProducer:
        """A producer whose sends this broker acknowledges (or not: see the controls)."""
        producer = LocalProducer(self)
        self.producers.append(producer)
        return producer

    def _send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Any, partition: int | None
    ) -> Future:
        future = Future()
        with self._lock:
            if self._refuse_sends:
                self._refuse_sends -= 1
                raise KafkaTimeoutError("local broker: send refused (test control)")
            self.create_topic(topic, 1)
            count = len(self.topics[topic])
            part = partition if partition is not None else (zlib.crc32(key) % count if key is not None else 0)
            pending = _Pending(topic, part, _record(topic, part, -1, key, value, headers, None), future)
            if self._fail_sends:
                self._fail_sends -= 1
                error = self._send_error
                future.failure(error("local broker: delivery failed (test control)"))
                return future
            if self._holding:
                self._held.append(pending)
                return future
        self._ack(pending)
        return future

    def _ack(self, pending: _Pending) -> None:
        with self._lock:
            records = self.topics[pending.topic][pending.partition]
            offset = len(records)
            records.append(pending.record._replace(offset=offset))
        tp = TopicPartition(pending.topic, pending.partition)
        pending.future.success(RecordMetadata(tp.topic, tp.partition, tp, offset, -1, None, 0, 0, 0))


def _record(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Any,
    timestamp_ms: int | None,
) -> ConsumerRecord:
    return ConsumerRecord(
        topic,
        partition,
        -1,
        offset,
        int(time.time() * 1000) if timestamp_ms is None else timestamp_ms,
        0,
        key,
        value,
        list(headers or []),
        None,
        len(key) if key is not None else -1,
        len(value) if value is not None else -1,
        -1,
    )


class LocalConsumer:
    """kafka-python's ``KafkaConsumer`` surface over a :class:`LocalBroker` (one group member)."""

    def __init__(self, broker: LocalBroker, group: str, max_poll_records: int) -> None:
        self._broker = broker
        self.group = group
        self.max_poll_records = max_poll_records
        self._topics: list[str] = []
        self._listener: ConsumerRebalanceListener | None = None
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._pending_rebalance: tuple[set[TopicPartition], str] | None = None
        self._rejoin_s = 0.0
        self._rejoin_at: float | None = None  # an eager revoke ran; the assignment comes at this time
        self._joined = False
        self.closed = False
        self.polls = 0

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener | None = None) -> None:
        """Subscribe; the first ``poll`` joins and assigns every partition of ``topics`` (unless told otherwise)."""
        self._topics = list(topics)
        self._listener = listener

    def _join(self) -> None:
        self._joined = True
        if self._pending_rebalance is None:
            everything = {tp for t in self._topics for tp in self._broker.partitions(t)}
            self._pending_rebalance = (everything, "eager")

    def _apply_rebalance(self) -> None:
        target, protocol = self._pending_rebalance  # type: ignore[misc]
        self._pending_rebalance = None
        old = set(self._assignment)
        listener = self._listener
        if protocol == "lost":
            self._drop(old)
            if listener is not None:
                listener.on_partitions_lost(old)
            added = target
        elif protocol == "eager":
            if self._rejoin_at is None and listener is not None and old:
                listener.on_partitions_revoked(old)  # before the rejoin: the client still holds them
            if self._rejoin_s:
                if self._rejoin_at is None:
                    self._rejoin_at = time.monotonic() + self._rejoin_s
                if time.monotonic() < self._rejoin_at:
                    self._pending_rebalance = (target, protocol)  # the join completes at a later poll
                    return
                self._rejoin_at, self._rejoin_s = None, 0.0
            self._drop(old - target)
            added = target
        else:
            leaving = old - target
            self._drop(leaving)  # cooperative: the client drops them before the callback
            if listener is not None and leaving:
                listener.on_partitions_revoked(leaving)
            added = target - old
        self._assignment |= target
        for tp in target:
            if tp not in self._positions:
                committed = self._broker.committed(self.group, tp)
                self._positions[tp] = committed if committed is not None else 0
        if listener is not None:
            listener.on_partitions_assigned(added)

    def _drop(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._assignment.discard(tp)
            self._positions.pop(tp, None)
            self._paused.discard(tp)

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Records from the assigned, unpaused partitions (rebalance callbacks run first, here)."""
        if self.closed:
            raise RuntimeError("poll on a closed consumer")
        self.polls += 1
        if not self._joined:
            self._join()
        if self._pending_rebalance is not None:
            self._apply_rebalance()
        # While a join is under way no records come, until the assignment.
        budget = 0 if self._rejoin_at is not None else max_records or self.max_poll_records
        result: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp in sorted(self._assignment - self._paused):
            if budget <= 0:
                break
            with self._broker._lock:
                parts = self._broker.topics.get(tp.topic, [])
                log = parts[tp.partition] if tp.partition < len(parts) else []
                start = self._positions[tp]
                taken = log[start : start + budget]
            if taken:
                result[tp] = list(taken)
                self._positions[tp] = start + len(taken)
                budget -= len(taken)
        if not result and timeout_ms:
            time.sleep(min(timeout_ms / 1000.0, IDLE_SLEEP_S))
        return result

    def assignment(self) -> set[TopicPartition]:
        """The partitions this member holds."""
        return set(self._assignment)

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop fetching ``partitions`` (assigned ones only, like kafka-python)."""
        self._paused |= set(partitions) & self._assignment

    def resume(self, *partitions: TopicPartition) -> None:
        """Fetch ``partitions`` again."""
        self._paused -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        """The paused partitions."""
        return set(self._paused)

    def position(self, tp: TopicPartition) -> int:
        """The next offset ``poll`` returns for ``tp``."""
        return self._positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` next."""
        self._positions[tp] = offset

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None) -> None:
        """Commit ``offsets`` for the group (``CommitFailedError`` when told to fail)."""
        self._broker._commit(self.group, offsets or {}, asynchronous=False)

    def commit_async(
        self, offsets: dict[TopicPartition, OffsetAndMetadata] | None = None, callback: Any = None
    ) -> Future:
        """Commit without waiting (done at once here); a refused commit fails the returned future."""
        future = Future()
        try:
            self._broker._commit(self.group, offsets or {}, asynchronous=True)
        except CommitFailedError as exc:
            future.failure(exc)
        else:
            future.success(None)
        return future

    def committed(self, tp: TopicPartition, metadata: bool = False) -> int | OffsetAndMetadata | None:
        """The group's committed offset for ``tp``."""
        offset = self._broker.committed(self.group, tp)
        if offset is None or not metadata:
            return offset
        return OffsetAndMetadata(offset, "", -1)

    def highwater(self, tp: TopicPartition) -> int | None:
        """The end offset of ``tp`` (known here as soon as the partition was polled once)."""
        return self._broker.end_offset(tp) if tp in self._positions else None

    def close(self, autocommit: bool = True) -> None:
        """Leave the group (its partitions are free for others)."""
        self.closed = True
        self._assignment.clear()
        self._positions.clear()
        self._paused.clear()


class LocalProducer:
    """kafka-python's ``KafkaProducer`` surface over a :class:`LocalBroker`."""

    def __init__(self, broker: LocalBroker) -> None:
        self._broker = broker
        self.closed = False
        self.sent = 0

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future:
        """Queue one record; the returned future settles when the broker answers."""
        if self.closed:
            raise KafkaTimeoutError("send on a closed producer")
        self.sent += 1
        return self._broker._send(topic, value, key, headers, partition)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every answer: held sends never come within ``timeout`` (``KafkaTimeoutError`` at once)."""
        if self._broker.unacknowledged:
            raise KafkaTimeoutError(f"local broker: {self._broker.unacknowledged} sends unanswered (held)")

    def partitions_for(self, topic: str) -> set[int]:
        """The partition numbers of ``topic`` (created with one partition if unknown)."""
        self._broker.create_topic(topic, 1)
        return {tp.partition for tp in self._broker.partitions(topic)}

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting sends."""
        self.closed = True


@dataclass
class LocalClients:
    """Client factories for ``StreamPipeline(clients=...)``: every pipeline gets its own consumer and producer."""

    broker: LocalBroker
    group: str = "local-group"
    max_poll_records: int = 500
    made: list[Any] = field(default_factory=list)
    in_processes: bool = False  # these clients live in this process: intake stays on the loop thread
    purges_on_pause: bool = False  # the consumer says a pause drops its prefetch (as confluent-kafka's does)

    def consumer(self, settings: Any) -> LocalConsumer:
        consumer = self.broker.consumer(self.group, max_poll_records=self.max_poll_records)
        consumer.purges_on_pause = self.purges_on_pause
        self.made.append(consumer)
        return consumer

    def producer(self, settings: Any) -> LocalProducer:
        producer = self.broker.producer()
        self.made.append(producer)
        return producer
