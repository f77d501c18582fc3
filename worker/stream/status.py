"""What a stream worker reports about itself: one typed snapshot, read by the health endpoint and the Ray driver.

``PipelineStatus`` is taken on the loop thread once per turn and read from any thread (it is immutable).
``as_dict()`` is the JSON shape ``/readyz`` puts under ``detail`` and the Ray driver logs and aggregates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    """One worker's state: readiness and why not, partitions, work in flight, outages, counters."""

    worker: str
    ready: bool
    model_loaded: bool
    assigned: tuple[str, ...] = ()  # "topic-partition" of every assigned partition, sorted
    paused: int = 0  # partitions paused (backpressure, outage or drain)
    in_flight: int = 0  # consumed offsets not yet committable
    all_committed: bool = True  # nothing in flight and every completed offset committed (as of the last turn)
    outage: dict[str, Any] | None = (
        None  # per cause ("engine", "delivery"): reason, since, retries, next retry
    )
    counters: dict[str, int] = field(default_factory=dict)
    intake_processes: int = 0  # intake processes ready (started on the first burst of records)
    preparation_processes: int = 0  # image preparation processes ready (batching.prepare_processes)

    @property
    def reason(self) -> str | None:
        """Why the worker is not ready because of an outage (``engine_outage``, ``delivery_outage``), else None."""
        if not self.outage:
            return None
        return "+".join(f"{cause}_outage" for cause in self.outage)

    def not_ready_reason(self) -> str:
        """Why the worker is not ready, machine-readable (what ``/readyz`` answers with its 503)."""
        if not self.model_loaded:
            return "model_not_loaded"
        if not self.assigned:
            return "no_partitions_assigned"
        return self.reason or "not_ready"

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of the status (``reason`` present only during an outage)."""
        body: dict[str, Any] = {
            "worker": self.worker,
            "ready": self.ready,
            "model_loaded": self.model_loaded,
            "assigned": list(self.assigned),
            "paused": self.paused,
            "in_flight": self.in_flight,
            "all_committed": self.all_committed,
            "outage": self.outage,
            "counters": dict(self.counters),
            "intake_processes": self.intake_processes,
            "preparation_processes": self.preparation_processes,
        }
        if self.reason is not None:
            body["reason"] = self.reason
        return body
