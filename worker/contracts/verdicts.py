"""Verdicts: the output contract (``schemas/verdict.v1.json``), built from an engine result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.contracts.dead_letters import SourceCoordinates, utc_now_rfc3339
from worker.contracts.events import ChatEvent

if TYPE_CHECKING:
    from worker.engine.blocklist import BlocklistHit

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
    category_scores: dict[str, float] | None = None,
    review_threshold: float | None = None,
    review: bool = False,
    blocklist: tuple[BlocklistHit, ...] = (),
    halted: bool = False,
    language: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The verdict record for one event. ``categories`` are ``[{"code": "S9", "name": "..."}]``.

    Fields after ``dropped_codes`` are optional within schema v1: absent when there is nothing to say
    (no category scores in generate mode, no review band configured, no blocklist hit).
    """
    verdict: dict[str, Any] = {  # in the contract's order; the event's own values come from _fill_event
        "schema_version": VERDICT_SCHEMA_VERSION,
        "event_id": None,
        "conversation_id": None,
        "task": None,
        "decision": "unsafe" if unsafe else "safe",
        "flagged": unsafe,
        "categories": categories,
        "score": min(1.0, max(0.0, float(score))),
        "threshold": threshold,
        "policy": {"id": policy_id, "hash": policy_hash},
        "model": model.as_dict(),
        "cached": cached,
        "latency_ms": None,
        "decided_at": None,
        "dropped": None,
    }
    _fill_event(verdict, event, latency_ms)
    if dropped_codes:
        verdict["dropped_codes"] = dropped_codes
    if category_scores is not None:
        verdict["category_scores"] = category_scores
    if review_threshold is not None:
        verdict["review_threshold"] = review_threshold
        verdict["review"] = review
    if blocklist:
        verdict["blocklist"] = {"halted": halted, "hits": [hit.as_dict() for hit in blocklist]}
    if language is not None:
        verdict["language"] = language
    if source is not None:
        verdict["source"] = source.as_dict()
    return verdict


def _fill_event(verdict: dict[str, Any], event: ChatEvent, latency_ms: float) -> None:
    """Set the fields of ``verdict`` that are the event's own (and the latency and decision time), in place.

    Keys already present keep their place; ``created_at`` and ``tenant`` are added when the event has them.
    """
    verdict["event_id"] = event.event_id
    verdict["conversation_id"] = event.conversation_id
    verdict["task"] = event.task.value
    verdict["latency_ms"] = round(float(latency_ms), 3)
    verdict["decided_at"] = utc_now_rfc3339()
    verdict["dropped"] = {
        "messages": event.dropped_messages,
        "images": event.dropped_images,
        "merged_messages": event.merged_messages,
    }
    if event.created_at is not None:
        verdict["created_at"] = event.created_at
    if event.tenant is not None:
        verdict["tenant"] = event.tenant


# Verdict templates. A wave of repeats is answered from one cached result (``Moderator.answers`` shares
# it), and its verdicts differ only in the event's own fields, the latency, the decision time and the
# source: the rest is built once per result, policy, model, ``cached`` and shape (which optional event
# fields are present, so the keys keep their order) and copied. An entry holds its result, policy and model,
# so their ids are never reused while it is kept.
_TEMPLATES: dict[tuple[Any, ...], tuple[Any, Any, ModelInfo, dict[str, Any]]] = {}
TEMPLATES_MAX = 1024


def verdict_for(
    event: ChatEvent,
    result: Any,
    policy: Any,
    model: ModelInfo,
    *,
    cached: bool,
    latency_ms: float,
    hits: tuple[BlocklistHit, ...] = (),
    source: SourceCoordinates | None = None,
) -> dict[str, Any]:
    """``build_verdict`` from a ``GuardResult`` and its ``Policy`` (stream and HTTP build verdicts the same way).

    A halting blocklist hit names its categories (S-codes in the policy's wording, or custom ids) itself.
    The same result, policy and model give the same verdict but for the event's fields, ``latency_ms``,
    ``decided_at`` and ``source``: from the second time on it is a copy of the first with those replaced.
    """
    key = None
    if not hits:  # blocklist hits are the event's own: built afresh
        key = (
            id(result),
            id(policy),
            id(model),
            cached,
            event.created_at is None,
            event.tenant is None,
            source is None,
        )
        entry = _TEMPLATES.get(key)
        if entry is not None and entry[0] is result and entry[1] is policy and entry[2] is model:
            verdict = entry[3].copy()  # the event's fields are replaced in place: the keys keep their order
            _fill_event(verdict, event, latency_ms)
            if source is not None:
                verdict["source"] = source.as_dict()
            return verdict
    if result.halted:
        categories = list(
            {h.category: {"code": h.category, "name": h.name} for h in hits if h.action == "halt"}.values()
        )
    else:
        categories = policy.verdict_categories(result.codes)
    verdict = build_verdict(
        event,
        unsafe=result.unsafe,
        score=result.score,
        categories=categories,
        threshold=policy.threshold,
        policy_id=policy.id,
        policy_hash=policy.hash,
        model=model,
        cached=cached,
        latency_ms=latency_ms,
        source=source,
        dropped_codes=list(result.dropped_codes) or None,
        category_scores=result.category_scores,
        review_threshold=policy.review_threshold,
        review=policy.in_review_band(result.score, result.unsafe),
        blocklist=hits,
        halted=result.halted,
        language=result.language,
    )
    if key is not None:
        if len(_TEMPLATES) >= TEMPLATES_MAX:
            _TEMPLATES.clear()
        _TEMPLATES[key] = (result, policy, model, verdict.copy())
    return verdict


def event_lag_seconds(created_at: str | None, now: float) -> float | None:
    """Seconds from the event's ``created_at`` (RFC 3339) to ``now`` (epoch seconds); None if absent/unreadable."""
    if not created_at:
        return None
    try:
        created = datetime.fromisoformat(created_at)
    except ValueError:
        return None
    if created.tzinfo is None:
        return None
    return max(0.0, now - created.timestamp())
