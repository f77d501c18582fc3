"""Reading a labelled evaluation set: JSON lines of ``{"event": {...}, "label": {...}}``.

``event`` is a chat event exactly as producers send it (``schemas/chat_event.v1.json``); ``label`` is
``{"decision": "safe" | "unsafe", "categories": ["S1", ...]}`` (categories required, and non-empty, only
for ``unsafe``). A line that cannot be used becomes a ``BadLine`` with its number and a reason; nothing is
silently counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from worker.config import CATEGORY_CODES, Settings
from worker.contracts.decode import decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Rejection


@dataclass(frozen=True, slots=True)
class LabelledEvent:
    line: int
    event: ChatEvent
    expected_unsafe: bool
    expected_codes: frozenset[str]


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    reason: str
    message: str


def _label(obj: object) -> tuple[bool, frozenset[str]] | str:
    if not isinstance(obj, dict):
        return "missing or non-object 'label'"
    decision = obj.get("decision")
    if decision not in ("safe", "unsafe"):
        return "label.decision must be 'safe' or 'unsafe'"
    codes = obj.get("categories", [])
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        return "label.categories must be a list of category codes"
    unknown = [c for c in codes if c not in CATEGORY_CODES]
    if unknown:
        return f"label.categories has unknown codes {unknown}"
    if decision == "unsafe" and not codes:
        return "label.categories must name at least one code for an unsafe label"
    if decision == "safe" and codes:
        return "label.categories must be empty for a safe label"
    return decision == "unsafe", frozenset(codes)


def read_labelled(path: Path, settings: Settings) -> Iterator[LabelledEvent | BadLine]:
    """Yield each non-blank line of ``path`` as a LabelledEvent or a BadLine (1-based line numbers)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield BadLine(number, "invalid_json", f"line is not valid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield BadLine(number, "not_an_object", "line must be a JSON object with 'event' and 'label'")
                continue
            label = _label(obj.get("label"))
            if isinstance(label, str):
                yield BadLine(number, "bad_label", label)
                continue
            if "event" not in obj:
                yield BadLine(number, "missing_field", "missing 'event'")
                continue
            decoded = decode_event(orjson.dumps(obj["event"]), settings)
            if isinstance(decoded, Rejection):
                yield BadLine(number, decoded.reason.value, f"invalid event: {decoded.message}")
                continue
            yield LabelledEvent(number, decoded, label[0], label[1])
