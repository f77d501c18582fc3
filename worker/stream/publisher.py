"""Publishing output records, and reporting when the broker has acknowledged them.

What each answer publishes (topics, key, value, headers) is ``worker.stream.records``; this module sends it.
An event is *delivered* only when every record it produced is acknowledged. Deliveries are reported
through ``drain_acks()`` as ``(token, error)`` pairs, so the pipeline marks offsets completed only for
acked work. ``drain_acks`` reads the send futures' state on the caller's thread instead of registering
callbacks: a callback would run once per record on kafka-python's I/O thread and take a lock there,
competing for the GIL with the loop thread; reading ``is_done`` of the pending futures in bulk costs a
fraction of that (measured with ``benchmarks/bench_stream.py``, P1). A confluent-kafka producer
(``kafka.client: confluent-kafka``) settles its futures only when its delivery reports are served:
``drain_acks`` serves them first, on the same thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.future import Future

from worker.config import TopicSettings
from worker.stream.records import Encoder, OutputRecord

if TYPE_CHECKING:
    from worker.stream.confluent_clients import ConfluentProducer

log = logging.getLogger(__name__)


def output_topics(topics: TopicSettings) -> list[str]:
    """Every topic the publisher may write to, in the order a worker should learn their metadata."""
    return ([topics.verdicts] if topics.publish_all_verdicts else []) + [
        topics.flagged,
        topics.review,
        topics.dlq,
    ]


class Publisher:
    """Sends output records for events and tells, per event, when all of them are acknowledged."""

    def __init__(
        self,
        producer: KafkaProducer | ConfluentProducer,
        topics: TopicSettings,
        encoder: Encoder | None = None,
    ) -> None:
        self._producer = producer
        self.encoder = encoder if encoder is not None else Encoder(topics)
        # Events with records on the way, in send order: (token, the send futures of its records).
        self._pending: deque[tuple[Hashable, list[Future]]] = deque()
        # Deliveries settled without waiting for the broker (nothing to send, or send() itself failed).
        self._settled: list[tuple[Any, BaseException | None]] = []
        # confluent-kafka: delivery reports wait in librdkafka until served (kafka-python has no such step).
        self._serve_deliveries = getattr(producer, "serve_deliveries", None)

    def publish(self, output: OutputRecord, token: Any) -> None:
        """Send ``output`` to each of its topics; ``token`` is reported by ``drain_acks`` once all are answered."""
        self._send(output.topics, output.key, output.value, output.headers, token)

    def _send(
        self, topics: tuple[str, ...], key: bytes | None, value: bytes, headers: list, token: Any
    ) -> None:
        if not topics:  # a safe verdict with publish_all_verdicts off: nothing to wait for
            self._settled.append((token, None))
            return
        futures = []
        for topic in topics:
            try:
                futures.append(self._producer.send(topic, value=value, key=key, headers=headers))
            except Exception as exc:  # noqa: BLE001 — buffer full / producer closing: report, the pipeline re-publishes
                # Records already sent for this event may still be acked; the re-publish duplicates them
                # (at-least-once: outputs carry event_id). Their futures are simply not watched any more.
                self._settled.append((token, exc))
                return
        self._pending.append((token, futures))

    @property
    def awaiting_acks(self) -> bool:
        """Whether some sent records have not been answered by the broker yet."""
        return bool(self._pending)

    def drain_acks(self) -> list[tuple[Any, BaseException | None]]:
        """Deliveries settled since the last call: ``(token, None)`` when acked, ``(token, error)`` if failed.

        An event is reported once: when all its records are acknowledged, or as soon as one has failed.
        """
        if self._serve_deliveries is not None and self._pending:
            self._serve_deliveries(0)
        done, self._settled = self._settled, []
        if not self._pending:
            return done
        waiting: deque[tuple[Hashable, list[Future]]] = deque()
        for entry in self._pending:
            futures = entry[1]
            if len(futures) == 1:  # the common case, kept free of the general loop below
                future = futures[0]
                if future.is_done:
                    done.append((entry[0], future.exception))
                else:
                    waiting.append(entry)
                continue
            error = next((f.exception for f in futures if f.is_done and f.exception is not None), None)
            if error is not None:
                done.append((entry[0], error))
            elif all(f.is_done for f in futures):
                done.append((entry[0], None))
            else:
                waiting.append(entry)
        self._pending = waiting
        return done

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything buffered and wait for the broker's answers (up to ``timeout_s``)."""
        self._producer.flush(timeout=timeout_s)


class BatchPublisher:
    """Publishes a batch of output records and waits for the broker's answers to all of them (intake processes).

    ``publish`` as ``Publisher.publish``; ``wait`` sends what is buffered and returns the tokens whose every
    record the broker acknowledged within the timeout. On a confluent-kafka producer made with
    ``reports="errors"`` nothing is watched per record: librdkafka reports failures only (each names its
    token), and once ``flush`` returns with nothing left every other record is acknowledged — a delivered
    record costs no Python at all. When records are left at the timeout, which of them were delivered is not
    known: none of the batch counts as acknowledged (the caller publishes it again: at least once, never
    lost). Any other producer goes through ``Publisher``'s futures.
    """

    def __init__(
        self, producer: KafkaProducer | ConfluentProducer, topics: TopicSettings, encoder: Encoder
    ) -> None:
        self.encoder = encoder
        self._producer = producer
        self._unwatched = getattr(producer, "send_unwatched", None)
        sender = getattr(producer, "unwatched_sender", None)
        self._send_fast = sender() if sender is not None else None
        self._watched = Publisher(producer, topics, encoder) if self._unwatched is None else None
        self._tokens: list[Any] = []
        self._failed: set[Any] = set()
        self._drained: list[tuple[Any, BaseException | None]] = []  # watched deliveries read by ``settled``

    def publish(self, output: OutputRecord, token: Any) -> None:
        """Send ``output`` to each of its topics (see ``Publisher.publish``)."""
        if self._watched is not None:
            self._watched.publish(output, token)
            return
        self._tokens.append(token)

        def failed(error: Any, message: Any) -> None:
            if error is not None:
                self._failed.add(token)

        send = self._send_fast if not self._producer.closed else None  # type: ignore[union-attr]
        try:
            for topic in output.topics:
                if send is not None:
                    try:
                        send(topic, output.value, output.key, on_delivery=failed, headers=output.headers)
                        continue
                    except BufferError:
                        pass  # librdkafka's queue is full: send_unwatched waits for room
                self._unwatched(topic, output.value, output.key, output.headers, failed)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 — buffer full / producer closing / a record refused: not published (redone by the caller)
            self._failed.add(token)

    def settled(self) -> bool:
        """Whether the broker has answered every record published so far, without waiting (on an unwatched
        producer: every record that producer has sent, this batch's and any other's)."""
        if self._watched is not None:
            self._drained += self._watched.drain_acks()
            return not self._watched.awaiting_acks
        return bool(self._producer.idle())  # type: ignore[union-attr]  # unwatched: a ConfluentProducer

    def wait(self, timeout_s: float) -> list[Any]:
        """Send what is buffered and wait up to ``timeout_s``: the tokens acknowledged in full."""
        if self._watched is not None:
            try:
                self._watched.flush(timeout_s)
            except KafkaError:
                pass  # what is not acknowledged in time is not reported as acknowledged
            drained, self._drained = self._drained + self._watched.drain_acks(), []
            return [token for token, error in drained if error is None]
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError:  # records left: which were delivered is not known
            return []
        tokens, failed, self._tokens, self._failed = self._tokens, self._failed, [], set()
        return [token for token in tokens if token not in failed] if failed else tokens
