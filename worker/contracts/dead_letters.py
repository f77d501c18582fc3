"""The dead-letter record: a rejected input (``worker.contracts.rejections``) with its original bytes and source.

Built exactly as ``schemas/dead_letter.v1.json`` describes it; a test keeps the two identical.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.contracts.rejections import Rejection


@dataclass(slots=True)  # not frozen (built per record on the hit path), never changed: see ChatEvent
class SourceCoordinates:
    """Where a record came from in Kafka."""

    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


# The formatted second of the last call: verdicts come thousands a second on the cache-hit path, and
# formatting a datetime was half the cost of building one; only the milliseconds change within a second.
_second_prefix: tuple[int, str] = (-1, "")


def utc_now_rfc3339(now_ns: int | None = None) -> str:
    """Now (or ``now_ns``, epoch nanoseconds), as an RFC 3339 timestamp with milliseconds and a ``Z``.

    The same text as ``datetime.now(UTC).isoformat(timespec="milliseconds")`` with ``Z`` for ``+00:00``
    (milliseconds truncated, not rounded).
    """
    global _second_prefix
    second, nanos = divmod(time.time_ns() if now_ns is None else now_ns, 1_000_000_000)
    cached_second, prefix = _second_prefix
    if cached_second != second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_prefix = (second, prefix)
    return f"{prefix}.{nanos // 1_000_000:03d}Z"


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
