"""Publishing verdicts and dead letters, and reporting when the broker has acknowledged them.

Every verdict goes to the verdicts topic (unless ``topics.publish_all_verdicts`` is off) and unsafe
ones also to the flagged topic; dead letters go to the DLQ. Records are keyed by ``conversation_id``
(so a conversation keeps its order within a partition), carry headers (event_id, schema, policy,
model) and are orjson-encoded.

An event is *delivered* only when every record it produced is acknowledged. Deliveries are reported
through ``drain_acks()`` as ``(token, error)`` pairs — on the caller's thread, because kafka-python runs
delivery callbacks on its I/O thread — so the pipeline marks offsets completed only for acked work.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Hashable
from typing import Any

import orjson
from kafka import KafkaProducer

from worker.config import TopicSettings

log = logging.getLogger(__name__)

VERDICT_SCHEMA = b"verdict.v1"
DEAD_LETTER_SCHEMA = b"dead_letter.v1"


class _Delivery:
    """Counts the acknowledgements one event still waits for; reports success or the first error once."""

    __slots__ = ("_acks", "_lock", "_remaining", "_reported", "token")

    def __init__(
        self, token: Hashable, remaining: int, acks: queue.SimpleQueue[tuple[Any, BaseException | None]]
    ):
        self.token = token
        self._remaining = remaining
        self._acks = acks
        self._lock = threading.Lock()
        self._reported = False

    def acked(self, _metadata: object = None) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining > 0 or self._reported:
                return
            self._reported = True
        self._acks.put((self.token, None))

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self._acks.put((self.token, exc))


class Publisher:
    """Sends output records for events and tells, per event, when all of them are acknowledged."""

    def __init__(self, producer: KafkaProducer, topics: TopicSettings) -> None:
        self._producer = producer
        self._topics = topics
        self._acks: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()

    def publish_verdict(self, verdict: dict[str, Any], token: Any) -> None:
        """Send ``verdict`` to the verdicts topic and, if flagged, to the flagged topic."""
        destinations = []
        if self._topics.publish_all_verdicts:
            destinations.append(self._topics.verdicts)
        if verdict["flagged"]:
            destinations.append(self._topics.flagged)
        policy, model = verdict["policy"], verdict["model"]
        headers = [
            ("event_id", verdict["event_id"].encode()),
            ("schema", VERDICT_SCHEMA),
            ("policy", f"{policy['id']}:{policy['hash']}".encode()),
            ("model", f"{model['id']}@{model['revision'] or ''}".encode()),
        ]
        self._send(destinations, verdict["conversation_id"].encode(), orjson.dumps(verdict), headers, token)

    def publish_dead_letter(self, dead_letter: dict[str, Any], key: bytes | None, token: Any) -> None:
        """Send ``dead_letter`` to the DLQ, keyed like the original record."""
        headers = [("schema", DEAD_LETTER_SCHEMA), ("reason", dead_letter["reason"].encode())]
        if "event_id" in dead_letter:
            headers.insert(0, ("event_id", dead_letter["event_id"].encode()))
        self._send([self._topics.dlq], key, orjson.dumps(dead_letter), headers, token)

    def _send(self, topics: list[str], key: bytes | None, value: bytes, headers: list, token: Any) -> None:
        delivery = _Delivery(token, len(topics), self._acks)
        if not topics:  # a safe verdict with publish_all_verdicts off: nothing to wait for
            self._acks.put((token, None))
            return
        for topic in topics:
            try:
                future = self._producer.send(topic, value=value, key=key, headers=headers)
            except Exception as exc:  # noqa: BLE001 — buffer full / producer closing: report, the pipeline re-publishes
                delivery.failed(exc)
                return
            future.add_callback(delivery.acked)
            future.add_errback(delivery.failed)

    def drain_acks(self) -> list[tuple[Any, BaseException | None]]:
        """Deliveries reported since the last call: ``(token, None)`` when acked, ``(token, error)`` if failed."""
        done = []
        while True:
            try:
                done.append(self._acks.get_nowait())
            except queue.Empty:
                return done

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything buffered and wait for the broker's answers (up to ``timeout_s``)."""
        self._producer.flush(timeout=timeout_s)
