"""A ``VerdictCache`` stand-in kept in a dict: the stream's logic tests run without Redis.

Same surface as ``worker.cache.redis_cache.VerdictCache`` (``get_many``/``set_many`` for verdicts,
``get_raw``/``set_raw`` for the published markers, ``enabled``/``available``, ``close``) and the same
outage behaviour: while ``down`` is set every lookup misses and every write is dropped, never raising.
TTLs are recorded, not enforced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


class InMemoryCache:
    """Verdicts and markers in a dict; ``down = True`` simulates an unreachable Redis."""

    def __init__(self, *, key_prefix: str = "mw:", enabled: bool = True) -> None:
        self._prefix = key_prefix
        self.enabled = enabled
        self.down = False
        self.store: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.closed = False

    @property
    def available(self) -> bool:
        """Whether lookups reach the store now."""
        return self.enabled and not self.down

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """Cached verdict entries for ``keys`` (None for a miss); all None while down."""
        raw = self.get_raw([self._prefix + k for k in keys])
        if raw is None:
            return [None] * len(keys)
        return [orjson.loads(blob) if blob is not None else None for blob in raw]

    def set_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store verdict entries (dropped while down)."""
        self.set_raw([(self._prefix + k, orjson.dumps(v)) for k, v in items], 0)

    def get_raw(self, full_keys: Sequence[str]) -> list[bytes | None] | None:
        """Stored bytes of ``full_keys``; None while down or disabled (as ``VerdictCache``)."""
        if not full_keys or not self.available:
            return None
        return [self.store.get(k) for k in full_keys]

    def set_raw(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        """Store ``(full_key, bytes)`` pairs (dropped while down)."""
        if not self.available:
            return
        for key, value in items:
            self.store[key] = value
            self.ttls[key] = ttl_s

    def keys(self, contains: str) -> list[str]:
        """Stored keys containing ``contains`` (e.g. ``"pub:"`` for published markers)."""
        return [k for k in self.store if contains in k]

    def close(self) -> None:
        """Nothing to release; recorded for tests."""
        self.closed = True
