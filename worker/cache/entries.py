"""What the verdict cache stores for a model answer, and how it becomes an engine result again.

One format for the stream and the HTTP endpoint, so either can answer from what the other classified.
"""

from __future__ import annotations

from typing import Any

from worker.engine.types import GuardResult


def to_entry(result: GuardResult) -> dict[str, Any]:
    """Just enough of a model answer to rebuild its verdict."""
    entry: dict[str, Any] = {
        "unsafe": result.unsafe,
        "score": result.score,
        "codes": list(result.codes),
        "dropped": list(result.dropped_codes),
    }
    # Optional keys: entries written before they existed still read back (the verdict then lacks them).
    if result.category_scores is not None:
        entry["category_scores"] = result.category_scores
    if result.halted:
        entry["halted"] = True
    if result.language is not None:
        entry["language"] = result.language
    return entry


def from_entry(value: dict[str, Any]) -> GuardResult | None:
    """A cached entry as an engine result; None when its shape is unexpected (treated as a miss)."""
    try:
        return GuardResult(
            score=float(value["score"]),
            unsafe=bool(value["unsafe"]),
            codes=tuple(value["codes"]),
            dropped_codes=tuple(value.get("dropped", ())),
            category_scores=value.get("category_scores"),
            halted=bool(value.get("halted", False)),
            language=value.get("language"),
        )
    except (KeyError, TypeError, ValueError):
        return None
