"""Run the stream through local GuardWorker actors until the consumer group has committed N more events.

Test support for the Ray runner: counting committed offsets (not worker counters) stays right across actor
restarts and duplicate processing, because an offset is committed only once its output is acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from worker.config import Settings
from worker.runners.ray_env import init_ray
from worker.runners.ray_fleet import WorkerFleet

log = logging.getLogger(__name__)


class GroupProgress:
    """Events the consumer group has committed on the events topic since this object was created.

    Counting committed offsets (not worker counters) stays right across actor restarts and duplicate
    processing: an offset is committed only once its verdict or dead letter is published.
    """

    def __init__(self, settings: Settings) -> None:
        from worker.stream.kafka_clients import make_consumer

        self._topic = settings.topics.events
        # Reads committed offsets of the group without joining it (never subscribes or polls).
        self._consumer = make_consumer(settings, enable_auto_commit=False)
        self._partitions: list[TopicPartition] = []
        self._baseline = self.committed_offsets()
        # Split pools: every pool's group reads every event; an event is done when the slowest pool has it.
        self._pools = (
            [GroupProgress(group) for _, group in WorkerFleet(settings).groups()]
            if settings.pools and settings.pool is None
            else []
        )

    def committed_offsets(self) -> dict[int, int]:
        """Committed offset per partition (0 when the group has none yet)."""
        if not self._partitions:  # the topic may not exist yet, or metadata may not be fetched yet
            from kafka import TopicPartition

            partitions = self._consumer.partitions_for_topic(self._topic) or set()
            self._partitions = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        return {tp.partition: self._consumer.committed(tp) or 0 for tp in self._partitions}

    def completed(self) -> int:
        """Events committed since the baseline (split pools: by every pool's group)."""
        if self._pools:
            return min(pool.completed() for pool in self._pools)
        now = self.committed_offsets()
        return sum(now[p] - self._baseline.get(p, 0) for p in now)

    def close(self) -> None:
        """Close the offset readers."""
        self._consumer.close(autocommit=False)
        for pool in self._pools:
            pool.close()


@dataclass
class DrainReport:
    """What ``run_until_drained`` saw."""

    drained: bool
    completed_events: int
    expected_events: int
    elapsed_s: float
    workers: int
    restarts_seen: int
    final_statuses: list[dict[str, Any]]


def run_until_drained(
    settings: Settings,
    expected_events: int,
    timeout_s: float,
    *,
    ready_timeout_s: float = 120.0,
    on_ready: Callable[[WorkerFleet], None] | None = None,
    poll_interval_s: float = 0.5,
    ready_again_timeout_s: float = 0.0,
) -> DrainReport:
    """Run the stream through GuardWorker actors until ``expected_events`` more events are committed.

    Joins or starts Ray like ``run_on_ray`` (a local instance is shut down at the end), waits up to
    ``ready_timeout_s`` for every worker to be ready, calls ``on_ready(fleet)`` (e.g. to start
    producing the events), then polls until the group's committed offsets on ``topics.events`` have
    advanced by ``expected_events`` or ``timeout_s`` (counted from readiness) passes, and drains the
    actors. Events already on the topic count, as long as the group had not committed them before
    the call. Returns a ``DrainReport``; ``drained`` is False on timeout (never raises for it).
    ``ready_again_timeout_s``: once drained, wait up to that long for every worker to be ready again (a worker
    Ray is still restarting then reports its new incarnation in the final statuses).
    """
    started_local = init_ray(settings)
    fleet = WorkerFleet(settings)
    progress = GroupProgress(settings)
    begin = time.monotonic()
    completed = 0
    drained = False
    finals: list[dict[str, Any]] = []
    try:
        fleet.start()
        if not fleet.wait_ready(ready_timeout_s):
            log.warning("guard workers not ready after %.0fs; continuing", ready_timeout_s)
        if on_ready is not None:
            on_ready(fleet)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fleet.poll()
            completed = progress.completed()
            if completed >= expected_events:
                drained = True
                if ready_again_timeout_s:
                    fleet.wait_ready(ready_again_timeout_s)
                break
            time.sleep(poll_interval_s)
        restarts = fleet.restarts_seen
        workers = len(fleet.slots)
        finals = fleet.stop()
    finally:
        progress.close()
        if fleet.slots:
            fleet.stop()
        if started_local:
            import ray

            ray.shutdown()
    return DrainReport(
        drained=drained,
        completed_events=completed,
        expected_events=expected_events,
        elapsed_s=time.monotonic() - begin,
        workers=workers,
        restarts_seen=restarts,
        final_statuses=finals,
    )
