"""Verdicts: the output contract (``schemas/verdict.v1.json``), built from an engine result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.dead_letters import SourceCoordinates, utc_now_rfc3339
from worker.events import ChatEvent

VERDICT_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Which weights decided: reported in every verdict and part of the cache key.

    ``name`` is the configured model name (``models.<name>``; ``default`` for the single ``model`` section)
    and ``family`` its Llama Guard family; both are None only where no configuration named the model.
    """

    id: str
    revision: str | None = None
    name: str | None = None
    family: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The verdict's ``model`` block (``name`` and ``family`` when known)."""
        block: dict[str, Any] = {"id": self.id, "revision": self.revision}
        if self.name is not None:
            block["name"] = self.name
        if self.family is not None:
            block["family"] = self.family
        return block


def build_verdict(
    event: ChatEvent,
    *,
    unsafe: bool,
    score: float,
    categories: list[dict[str, str]],
    threshold: float,
    policy_id: str,
    policy_hash: str,
    model: ModelInfo,
    cached: bool,
    latency_ms: float,
    source: SourceCoordinates | None = None,
    dropped_codes: list[str] | None = None,
) -> dict[str, Any]:
    """The verdict record for one event. ``categories`` are ``[{"code": "S9", "name": "..."}]``."""
    verdict: dict[str, Any] = {
        "schema_version": VERDICT_SCHEMA_VERSION,
        "event_id": event.event_id,
        "conversation_id": event.conversation_id,
        "task": event.task.value,
        "decision": "unsafe" if unsafe else "safe",
        "flagged": unsafe,
        "categories": categories,
        "score": min(1.0, max(0.0, float(score))),
        "threshold": threshold,
        "policy": {"id": policy_id, "hash": policy_hash},
        "model": model.as_dict(),
        "cached": cached,
        "latency_ms": round(float(latency_ms), 3),
        "decided_at": utc_now_rfc3339(),
    }
    if event.tenant is not None:
        verdict["tenant"] = event.tenant
    if dropped_codes:
        verdict["dropped_codes"] = dropped_codes
    if source is not None:
        verdict["source"] = source.as_dict()
    return verdict
