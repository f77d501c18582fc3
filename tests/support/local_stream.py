"""A ``StreamPipeline`` on the in-memory broker, cache and engine, stepped by the test itself.

``LocalStream`` builds the pipeline with ``LocalClients`` (``tests.support.local_broker``), a ``DictCache``
and a ``FakeEngine`` (``tests.support.fake_engine``), opens it, and lets a test inject events, drive loop turns
until a condition holds (``turn_until``), read the outputs and the group's commits, and drain. The
test thread runs the loop, so every rebalance and failure lands exactly between two turns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from kafka.structs import TopicPartition

from tests.support.fake_engine import DictCache, FakeEngine
from tests.support.local_broker import LocalBroker, LocalClients, LocalConsumer
from worker.config import Settings, load_settings
from worker.moderation.routing import consumer_group_id
from worker.stream.pipeline import StreamPipeline

TURN_LIMIT_S = 10.0  # a condition not reached in this long is a failure (the loop itself takes ms)


def local_settings(**overrides: Any) -> Settings:
    """Settings for a local stream: short batching waits and fast retries unless overridden."""
    base: dict[str, Any] = {
        "batching__max_wait_ms": 1,
        "failures__retry_initial_s": 0.005,
        "failures__retry_max_s": 0.02,
    }
    return load_settings(None, **{**base, **overrides})


def chat_event(i: int, text: str | None = None, *, prefix: str = "ev", **fields: Any) -> dict[str, Any]:
    """A valid text-only chat event ``{prefix}-{i}`` in conversation ``c-{i}``."""
    return {
        "event_id": f"{prefix}-{i}",
        "conversation_id": f"c-{i}",
        "messages": [{"role": "user", "content": text or f"how do I bake bread, attempt {i}?"}],
        **fields,
    }


class LocalStream:
    """One pipeline on a ``LocalBroker`` (``broker``), with its ``engine``, ``cache`` and ``consumer``."""

    def __init__(
        self,
        partitions: int = 2,
        *,
        broker: LocalBroker | None = None,
        engine: Any = None,
        cache: DictCache | None = None,
        name: str = "local",
        max_poll_records: int = 500,
        purges_on_pause: bool = False,
        **overrides: Any,
    ) -> None:
        self.settings = local_settings(**overrides)
        self.broker = broker if broker is not None else LocalBroker()
        self.topics = self.settings.topics
        self.broker.create_topic(self.topics.events, partitions)
        self.partitions = partitions
        self.engine = engine if engine is not None else FakeEngine(self.settings)
        self.cache = cache if cache is not None else DictCache()
        self.group = consumer_group_id(self.settings)
        self.clients = LocalClients(
            self.broker, group=self.group, max_poll_records=max_poll_records, purges_on_pause=purges_on_pause
        )
        self.pipeline = StreamPipeline(
            self.settings, self.engine, worker_name=name, cache=self.cache, clients=self.clients
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def open(self) -> LocalStream:
        """Open the pipeline (subscribe); the first turn joins and takes every partition."""
        self.pipeline.open()
        return self

    @property
    def consumer(self) -> LocalConsumer:
        """The pipeline's consumer."""
        return next(c for c in self.clients.made if isinstance(c, LocalConsumer))

    def turn(self, n: int = 1) -> None:
        """Run ``n`` loop turns."""
        for _ in range(n):
            self.pipeline.step()

    def turn_until(self, condition: Callable[[], bool], what: str, *, limit_s: float = TURN_LIMIT_S) -> int:
        """Run loop turns until ``condition()``; returns the turns taken, fails after ``limit_s``."""
        deadline = time.monotonic() + limit_s
        turns = 0
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not reached after {turns} turns: {what}; status {self.pipeline.status()}"
                )
            self.pipeline.step()
            turns += 1
        return turns

    def drain_and_close(self) -> None:
        """What SIGTERM does: stop fetching, drain, commit, close."""
        self.pipeline.request_stop()
        try:
            self.pipeline.drain()
        finally:
            self.pipeline.close()

    # -- input and output -------------------------------------------------------------------------

    def send(self, events: list[dict[str, Any] | bytes], *, partition: int | None = None) -> None:
        """Produce events (dicts or raw bytes) to the input topic, round-robin over partitions unless given."""
        for i, event in enumerate(events):
            value = event if isinstance(event, bytes) else orjson.dumps(event)
            key = f"c-{i}".encode() if isinstance(event, bytes) else event.get("conversation_id", "").encode()
            self.broker.produce(
                self.topics.events,
                value,
                key=key,
                partition=partition if partition is not None else i % self.partitions,
            )

    def verdicts(self) -> list[dict[str, Any]]:
        """Every verdict published (the verdicts topic)."""
        return self.broker.values(self.topics.verdicts)

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead letter published."""
        return self.broker.values(self.topics.dlq)

    def answered_ids(self) -> list[str]:
        """event_id of every verdict and dead letter, in publish order."""
        return [r["event_id"] for r in self.verdicts() + self.dead_letters()]

    def tp(self, partition: int) -> TopicPartition:
        """The input topic's partition ``partition``."""
        return TopicPartition(self.topics.events, partition)

    def committed(self) -> dict[int, int | None]:
        """The group's committed offset per input partition."""
        return {p: self.broker.committed(self.group, self.tp(p)) for p in range(self.partitions)}

    def end_offsets(self) -> dict[int, int]:
        """The input topic's end offset per partition."""
        return {p: self.broker.end_offset(self.tp(p)) for p in range(self.partitions)}

    def all_committed(self) -> bool:
        """Every input record answered and its offset committed."""
        return self.committed() == self.end_offsets()
