"""``POST /v1/moderations``: OpenAI's moderation API shape over the same engine, policies and cache.

Request (OpenAI's)::

    {"input": "text" | ["text", ...] | [{"type": "text", "text": ...}, {"type": "image_url",
     "image_url": {"url": ...}}, ...], "model": "any string (ignored; the worker's model answers)"}

plus two optional fields of ours: ``policy`` (a policy id, as in chat events; the OpenAI client sends it with
``extra_body``) and ``tenant`` (only without API keys; a key fixes the tenant). A string or a list of strings
gives one result per string; a list of parts is *one* input (text and image judged together), as in OpenAI's
API. Each input becomes a one-message chat event (role ``user``, i.e. prompt classification) and goes through
``worker.contracts.decode.decode_event``: the same limits and reason codes as the stream, errors in the project's shape.

Response (OpenAI's)::

    {"id": "modr-…", "model": "<model id>", "results": [{"flagged": …, "categories": {…}, "category_scores": {…},
     "category_applied_input_types": {…}, "verdict": {<the worker's verdict, schemas/verdict.v1.json>}}]}

Category mapping (``OPENAI_CATEGORIES``). Every one of OpenAI's 13 category names is always present, and
the MLCommons codes S1–S13 (plus custom blocklist categories) are present under their own keys too. An
OpenAI category is ``true`` when the verdict names any code mapped to it; its score is the highest
``category_scores`` value among those codes (a halting blocklist's category scores 1.0). The taxonomy does
not separate OpenAI's finer names (``*/threatening``, ``self-harm/intent``, ``self-harm/instructions``,
``violence/graphic``): they map from no code and are always false with score 0 — read the parent name.
S6 (Specialized Advice), S7 (Privacy), S8 (Intellectual Property) and S13 (Elections) have no OpenAI
counterpart and appear only under their own keys. ``serve.openai_categories`` adds or replaces mappings
(for custom categories, e.g. ``{"spam": ["illicit"]}``).

``category_applied_input_types``: Llama Guard judges text and image together, so every category applies to
every input type the input had (``["text"]`` or ``["text", "image"]``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.config import CATEGORY_CODES, OPENAI_CATEGORY_NAMES, Settings
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Reason, Rejection
from worker.serve.http_contract import TOO_MANY_EVENTS, RequestError, from_rejection

# MLCommons hazard code -> the OpenAI categories it counts for (see the module docstring for the reasons).
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"),  # Violent Crimes
    "S2": ("illicit",),  # Non-Violent Crimes
    "S3": ("sexual", "harassment"),  # Sex Crimes (its definition includes sexual harassment)
    "S4": ("sexual/minors", "sexual"),  # Child Exploitation
    "S5": ("harassment",),  # Defamation: an attack on a living person
    "S6": (),  # Specialized Advice
    "S7": (),  # Privacy
    "S8": (),  # Intellectual Property
    "S9": ("illicit/violent", "violence"),  # Indiscriminate Weapons
    "S10": ("hate",),  # Hate
    "S11": ("self-harm",),  # Self-Harm
    "S12": ("sexual",),  # Sexual Content
    "S13": (),  # Elections
}


@dataclass
class ModerationRequest:
    """The inputs of one ``/v1/moderations`` body as chat events, or the errors that refuse it."""

    events: list[ChatEvent] = field(default_factory=list)
    input_types: list[list[str]] = field(default_factory=list)  # per event: "text" and/or "image"
    errors: list[RequestError] = field(default_factory=list)


def _error(message: str, where: str, reason: Reason | str = Reason.INVALID_VALUE) -> ModerationRequest:
    return ModerationRequest(errors=[RequestError(str(reason), message, where)])


def parse_moderation_request(body: bytes, settings: Settings, tenant: str | None = None) -> ModerationRequest:
    """OpenAI request body → one chat event per input (decoded like a Kafka record), or the errors."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(f"body is not valid JSON: {exc}", "", Reason.INVALID_JSON)
    if not isinstance(obj, dict):
        return _error("the body must be a JSON object with an 'input' field", "", Reason.NOT_AN_OBJECT)
    unknown = set(obj) - {"input", "model", "policy", "tenant"}
    if unknown:
        return _error(
            f"unknown fields {sorted(unknown)}; known: input, model, policy, tenant",
            min(unknown),
            Reason.UNKNOWN_FIELD,
        )
    if "input" not in obj:
        return _error("'input' is required", "input", Reason.MISSING_FIELD)
    if obj.get("model") is not None and not isinstance(obj["model"], str):
        return _error("'model' must be a string", "model", Reason.WRONG_TYPE)
    raw = obj["input"]
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, dict) for x in raw):
        inputs = [raw]  # a list of parts is one multi-modal input
    else:
        return _error(
            "'input' must be a string, a non-empty list of strings, or a non-empty list of text/image_url parts",
            "input",
            Reason.WRONG_TYPE,
        )
    limit = settings.serve.max_events_per_request
    if len(inputs) > limit:
        return _error(
            f"{len(inputs)} inputs in one request, above the limit of {limit}", "input", TOO_MANY_EVENTS
        )
    request_id = uuid.uuid4().hex
    parsed = ModerationRequest()
    for index, content in enumerate(inputs):
        chat_event: dict[str, Any] = {
            "event_id": f"modr-{request_id}-{index}",
            "conversation_id": f"modr-{request_id}-{index}",
            "messages": [{"role": "user", "content": content}],
        }
        for name in ("policy", "tenant"):
            if obj.get(name) is not None:
                chat_event[name] = obj[name]
        if tenant is not None:
            chat_event["tenant"] = tenant
        from worker.contracts.decode import decode_event

        decoded = decode_event(orjson.dumps(chat_event), settings)
        if isinstance(decoded, Rejection):
            error = from_rejection(decoded, index if len(inputs) > 1 else None)
            where = (error.field or "").replace("messages[0].content", "input")
            parsed.errors.append(
                RequestError(
                    error.reason, error.message.replace("messages[0].content", "input"), where, error.index
                )
            )
            continue
        parsed.events.append(decoded)
        parsed.input_types.append(["text", "image"] if decoded.image is not None else ["text"])
    return parsed


def openai_result(
    verdict: Mapping[str, Any], input_types: list[str], extra_map: Mapping[str, list[str]] | None = None
) -> dict[str, Any]:
    """One ``results[]`` entry from a verdict (see the module docstring for the mapping)."""
    mapping: dict[str, tuple[str, ...]] = dict(OPENAI_CATEGORIES)
    for code, names in (extra_map or {}).items():
        mapping[code] = tuple(names)
    named = {c["code"] for c in verdict["categories"]}
    scores: dict[str, float] = dict(verdict.get("category_scores") or {})
    blocklist = verdict.get("blocklist") or {}
    if blocklist.get("halted"):
        for code in named:
            scores[code] = 1.0
    categories: dict[str, bool] = {name: False for name in OPENAI_CATEGORY_NAMES}
    category_scores: dict[str, float] = {name: 0.0 for name in OPENAI_CATEGORY_NAMES}
    own_codes = list(CATEGORY_CODES) + sorted(c for c in set(named) | set(mapping) if c not in CATEGORY_CODES)
    for code in own_codes:
        flagged = code in named
        score = float(scores.get(code, 1.0 if flagged and code not in CATEGORY_CODES else 0.0))
        categories[code] = flagged
        category_scores[code] = score
        for name in mapping.get(code, ()):
            categories[name] = categories[name] or flagged
            category_scores[name] = max(category_scores[name], score)
    return {
        "flagged": bool(verdict["flagged"]),
        "categories": categories,
        "category_scores": category_scores,
        "category_applied_input_types": {name: list(input_types) for name in categories},
        "verdict": dict(verdict),
    }


def openai_response(model_id: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The response body: ``id``, ``model`` (the worker's model id) and ``results``."""
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model_id, "results": results}
