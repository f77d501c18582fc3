"""Verdicts: the output contract (``schemas/verdict.v1.json``), built from an engine result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from worker.contracts.dead_letters import SourceCoordinates, utc_now_rfc3339
from worker.contracts.events import ChatEvent, Task

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


# Verdict bytes. A cache hit's verdict is encoded from a compiled template: the bytes ``orjson.dumps`` gives for
# ``verdict_for``'s record, cut where the event's own values go (event_id, conversation_id, task, latency_ms,
# decided_at, dropped and, when present, created_at, tenant and source). Rendering joins the constant pieces
# with the event's values, each encoded by orjson as the whole record would encode it: the same bytes as
# ``orjson.dumps(verdict_for(...))`` (the tests compare them), at a fraction of the cost of building and
# encoding a dict per event. A template is compiled from ``verdict_for`` itself, with placeholders for the
# event's values, so the contract is written in one place.
SLOTS = (
    "event_id",
    "conversation_id",
    "task",
    "latency_ms",
    "decided_at",
    "dropped",
    "created_at",
    "tenant",
    "source",
)
_PLACEHOLDER = "\x1fmw-verdict-slot:{}\x1f"  # no event value can equal it: one control character each side
# The task's JSON by the last turn's role (what ``ChatEvent.task`` decides on), without building the Task.
_TASK_BYTES_BY_ROLE = {
    "user": orjson.dumps(Task.PROMPT.value),
    "assistant": orjson.dumps(Task.RESPONSE.value),
}
# Latencies below this are written with ``%.3f`` (the same bytes as ``orjson.dumps(round(ms, 3))``, see
# ``latency_bytes``); larger ones, which orjson writes with an exponent, take orjson's path.
_FIXED_LATENCY_BELOW = 1e15


def latency_bytes(latency_ms: float) -> bytes:
    """``orjson.dumps(round(latency_ms, 3))``, in half the time: ``round`` converts to decimal once, and orjson
    again. ``%.3f`` rounds the same binary value to the same three decimals (both are correctly rounded); dropping
    the trailing zeros (keeping one after the point) gives the shortest form, which is what orjson writes."""
    if 0.0 <= latency_ms < _FIXED_LATENCY_BELOW:
        text = (b"%.3f" % latency_ms).rstrip(b"0")
        return text + b"0" if text[-1:] == b"." else text
    return orjson.dumps(round(float(latency_ms), 3))


_DROPPED_BYTES: dict[tuple[int, int, int], bytes] = {}
_COMPILED: dict[tuple[Any, ...], VerdictTemplate] = {}
_SOURCE_PREFIXES: dict[tuple[str, int], bytes] = {}


class _Placeholders:
    """What ``_fill_event`` reads of an event, as placeholders (the template's event)."""

    __slots__ = ("event_id", "conversation_id", "task", "created_at", "tenant")
    dropped_messages = dropped_images = merged_messages = 0

    def __init__(self, created_at: bool, tenant: bool) -> None:
        self.event_id = _PLACEHOLDER.format("event_id")
        self.conversation_id = _PLACEHOLDER.format("conversation_id")
        self.task = _PlaceholderTask()
        self.created_at = _PLACEHOLDER.format("created_at") if created_at else None
        self.tenant = _PLACEHOLDER.format("tenant") if tenant else None


class _PlaceholderTask:
    __slots__ = ()
    value = _PLACEHOLDER.format("task")


class VerdictTemplate:
    """The verdict of one result, policy, model and ``cached``, for events of one shape, as bytes to fill in.

    ``record`` is the verdict with placeholders for the event's values: what the edge reads of it (decision,
    categories, policy, model, review) is the same for every event it renders.
    """

    __slots__ = (
        "record",
        "decision",
        "codes",
        "cached",
        "review",
        "_pinned",
        "_format",
        "_created_at",
        "_tenant",
    )

    def __init__(
        self, record: dict[str, Any], pieces: list[bytes], shape: tuple[bool, bool], pinned: tuple[Any, ...]
    ):
        self.record = record
        self.decision: str = record["decision"]
        self.codes: tuple[str, ...] = tuple(c["code"] for c in record["categories"])
        self.cached: bool = record["cached"]
        self.review = bool(record.get("review"))
        # The constant pieces joined by ``%b`` slots (a literal ``%`` doubled): rendering is one C-level format.
        self._format = b"%b".join(piece.replace(b"%", b"%%") for piece in pieces[::2])
        self._created_at, self._tenant = shape
        self._pinned = pinned  # the result, policy and model whose ids key this template

    def render(
        self, event: ChatEvent, latency_ms: float, decided_at: bytes, source: SourceCoordinates | None
    ) -> bytes:
        """The verdict's JSON for ``event``; ``decided_at`` is ``orjson.dumps`` of ``utc_now_rfc3339()``."""
        dumps = orjson.dumps
        dropped = (event.dropped_messages, event.dropped_images, event.merged_messages)
        dropped_bytes = _DROPPED_BYTES.get(dropped)
        if dropped_bytes is None:
            dropped_bytes = _DROPPED_BYTES[dropped] = dumps(
                {"messages": dropped[0], "images": dropped[1], "merged_messages": dropped[2]}
            )
        values: tuple[bytes, ...] = (
            dumps(event.event_id),
            dumps(event.conversation_id),
            _TASK_BYTES_BY_ROLE[event.turns[-1].role],
            latency_bytes(latency_ms),
            decided_at,
            dropped_bytes,
        )
        if self._created_at:
            values += (dumps(event.created_at),)
        if self._tenant:
            values += (dumps(event.tenant),)
        if source is not None:
            values += (_source_bytes(source),)
        return self._format % values


def _source_bytes(source: SourceCoordinates) -> bytes:
    """``orjson.dumps`` of the verdict's ``source`` object: a constant prefix per partition, then the offset."""
    prefix = _SOURCE_PREFIXES.get((source.topic, source.partition))
    if prefix is None:
        if len(_SOURCE_PREFIXES) >= TEMPLATES_MAX:
            _SOURCE_PREFIXES.clear()
        encoded = orjson.dumps({"topic": source.topic, "partition": source.partition, "offset": 0})
        prefix = _SOURCE_PREFIXES[(source.topic, source.partition)] = encoded[: -len(b"0}")]
    return b"%b%d}" % (prefix, source.offset)


def verdict_template(
    result: Any, policy: Any, model: ModelInfo, *, cached: bool, created_at: bool, tenant: bool, source: bool
) -> VerdictTemplate:
    """The compiled template of ``verdict_for(event, result, policy, model, cached=cached, ...)`` for events with
    (``created_at``) or without a created_at, a tenant, and a source (no blocklist hits: those are the event's own).

    Kept per result, policy and model object (a cache read shares one result per distinct entry).
    """
    key = (id(result), id(policy), id(model), cached, created_at, tenant, source)
    template = _COMPILED.get(key)
    if template is not None:
        return template
    placeholders = _Placeholders(created_at, tenant)
    record = verdict_for(
        placeholders,  # type: ignore[arg-type]  # what _fill_event reads of an event
        result,
        policy,
        model,
        cached=cached,
        latency_ms=0.0,
        source=None,
    )
    record["latency_ms"] = _PLACEHOLDER.format("latency_ms")
    record["decided_at"] = _PLACEHOLDER.format("decided_at")
    record["dropped"] = _PLACEHOLDER.format("dropped")
    if source:
        record["source"] = _PLACEHOLDER.format("source")
    encoded = orjson.dumps(record)
    present = [
        name
        for name in SLOTS
        if (name != "created_at" or created_at)
        and (name != "tenant" or tenant)
        and (name != "source" or source)
    ]
    pieces: list[bytes] = []
    start = 0
    # In SLOTS order: verdict_for's key order (checked: a placeholder out of order fails the compile).
    for name in present:
        marker = orjson.dumps(_PLACEHOLDER.format(name))
        at = encoded.find(marker, start)
        if at < 0 or encoded.count(marker) != 1:
            raise RuntimeError(f"verdict template: the {name} placeholder is not where the contract puts it")
        pieces.append(encoded[start:at])
        pieces.append(b"")
        start = at + len(marker)
    pieces.append(encoded[start:])
    if len(_COMPILED) >= TEMPLATES_MAX:
        _COMPILED.clear()
    template = _COMPILED[key] = VerdictTemplate(record, pieces, (created_at, tenant), (result, policy, model))
    return template


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
