"""The dead-letter record: a rejected input (``worker.contracts.rejections``) with its original bytes and source.

Built exactly as ``schemas/dead_letter.v1.json`` describes it; a test keeps the two identical.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.contracts.rejections import Rejection


@dataclass(frozen=True, slots=True)
class SourceCoordinates:
    """Where a record came from in Kafka."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def utc_now_rfc3339() -> str:
    """Now, as an RFC 3339 timestamp with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_dead_letter(
    rejection: Rejection,
    original: bytes | None,
    source: SourceCoordinates | None,
    *,
    max_original_bytes: int,
    event_id: str | None = None,
    key: bytes | None = None,
) -> dict[str, Any]:
    """The dead-letter record (``schemas/dead_letter.v1.json``) for a rejected input."""
    original = original or b""
    kept = original[:max_original_bytes]
    record: dict[str, Any] = {
        "schema_version": 1,
        "reason": rejection.reason.value,
        "message": rejection.message,
        "original": {
            "value_base64": base64.b64encode(kept).decode("ascii"),
            "size_bytes": len(original),
            "truncated": len(kept) < len(original),
        },
        "failed_at": utc_now_rfc3339(),
    }
    if rejection.field is not None:
        record["field"] = rejection.field
    if event_id is not None:
        record["event_id"] = event_id
    if key is not None:
        record["original"]["key_base64"] = base64.b64encode(key).decode("ascii")
    if source is not None:
        record["source"] = source.as_dict()
    return record
