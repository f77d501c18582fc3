"""Redis verdict cache: one MGET per lookup round, SET EX of new verdicts in one script call.

The cache is an optimisation, never a dependency: when Redis cannot be reached every call answers
"miss" / does nothing, ``available`` turns False, the outage is counted
(``mw_cache_requests_total{result="error"}``, ``mw_redis_up`` = 0) and logged once, and a reconnect is
tried lazily at most every ``reconnect_interval_s`` — events never fail because the cache is down.

Values are small orjson objects holding only what is needed to rebuild a verdict (decision, score,
codes); the pipeline decides their content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.config import RedisSettings
from worker.ops import metrics

log = logging.getLogger(__name__)


# Many SET EX with one TTL in one command: a pipeline of SETs cost redis-py ≈5× more client CPU per key
# (one command object, packing and reply parsing each), and published markers write one key per answered
# event on the cache-hit path. The keys go to one Redis server (the worker does not use Redis Cluster).
_SET_MANY_WITH_TTL = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""
# Byte ranges written into string keys, each key's TTL set with its write: published markers keep a partition's
# markers as blocks of fixed-size slots (``worker.cache.published``), one SETRANGE per contiguous run.
_SET_RANGES_WITH_TTL = """
for i = 1, #KEYS do
  redis.call('SETRANGE', KEYS[i], ARGV[2 * i], ARGV[2 * i + 1])
  redis.call('EXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""
# Byte ranges read from string keys (an absent key reads as no bytes).
_GET_RANGES = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('GETRANGE', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i])
end
return out
"""
SET_MANY_CHUNK = 512  # keys per script call: keeps each call short on the server
PARSED_MAX = 4096  # distinct entries whose parsed value is kept between reads (cleared when full)


class VerdictCache:
    """Verdict store keyed by ``worker.cache.keys.cache_key``; never raises on a Redis outage."""

    def __init__(self, settings: RedisSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._prefix = settings.key_prefix
        self._ttl = settings.ttl_seconds
        self.enabled = settings.enabled
        self._client: redis.Redis | None = None
        self._set_many: Any = None  # the write scripts, registered when enabled (only called while usable)
        self._set_ranges: Any = None
        self._get_ranges: Any = None
        self._next_attempt = 0.0
        self._outage_logged = False
        self.available = False
        self._parsed: dict[bytes, dict[str, Any] | None] = {}  # entry bytes -> the shared parsed value
        if self.enabled:
            self._client = redis.Redis.from_url(
                settings.url,
                password=settings.password.get_secret_value() if settings.password else None,
                socket_timeout=settings.socket_timeout_s,
                socket_connect_timeout=settings.socket_timeout_s,
                # No hidden retries: a down Redis must cost one timeout, not several.
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
            self._set_many = self._client.register_script(_SET_MANY_WITH_TTL)
            self._set_ranges = self._client.register_script(_SET_RANGES_WITH_TTL)
            self._get_ranges = self._client.register_script(_GET_RANGES)
            self._try_reconnect(force=True)
        metrics.REDIS_UP.set(1 if self.available else 0)

    def _try_reconnect(self, *, force: bool = False) -> bool:
        """PING Redis if the reconnect interval has passed; returns whether the cache is usable now."""
        if self._client is None:
            return False
        now = self._clock()
        if not force and now < self._next_attempt:
            return False
        self._next_attempt = now + self._settings.reconnect_interval_s
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return False
        if not self.available:
            log.info("verdict cache reachable", extra={"stage": "cache"})
        self.available = True
        self._outage_logged = False
        metrics.REDIS_UP.set(1)
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if not self._outage_logged:  # once per outage, not once per failed call
            log.warning(
                "verdict cache unreachable; running uncached and retrying every %.1fs: %s",
                self._settings.reconnect_interval_s,
                type(exc).__name__,
                extra={"stage": "cache", "reason": "redis_unavailable"},
            )
            self._outage_logged = True
        self.available = False
        self._next_attempt = self._clock() + self._settings.reconnect_interval_s
        metrics.REDIS_UP.set(0)

    def _usable(self) -> bool:
        return self.enabled and (self.available or self._try_reconnect())

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """Cached values for ``keys`` (None for a miss) with one MGET of the distinct keys; all None when Redis is down.

        Equal entries are parsed once and share one dict, within a call and across calls (up to ``PARSED_MAX``
        distinct entries are remembered): a wave of repeats reads the same entry hundreds of times in one call,
        and in every call after. Callers read the values, never change them.
        """
        if not keys:
            return []
        # Each distinct key is read once: a wave repeats a few keys hundreds of times in one call.
        distinct = list(dict.fromkeys(keys))
        raw = self.get_raw([self._prefix + k for k in distinct])
        if raw is None:
            if self.enabled:
                metrics.CACHE_REQUESTS.labels(result="error").inc(len(keys))
            return [None] * len(keys)
        values: list[dict[str, Any] | None] = []
        parsed = self._parsed
        if len(parsed) >= PARSED_MAX:
            parsed.clear()
        for blob in raw:
            if blob is None:
                values.append(None)
                continue
            try:
                values.append(parsed[blob])
                continue
            except KeyError:
                pass
            try:
                value = orjson.loads(blob)
            except orjson.JSONDecodeError:
                value = None  # a corrupt entry is a miss; the fresh verdict overwrites it
            value = parsed[blob] = value if isinstance(value, dict) else None
            values.append(value)
        if len(distinct) < len(keys):
            by_key = dict(zip(distinct, values, strict=True))
            values = [by_key[k] for k in keys]
        hits = sum(v is not None for v in values)
        if hits:
            metrics.CACHE_REQUESTS.labels(result="hit").inc(hits)
        if len(values) - hits:
            metrics.CACHE_REQUESTS.labels(result="miss").inc(len(values) - hits)
        return values

    def get_raw(self, full_keys: Sequence[str]) -> list[bytes | None] | None:
        """Stored bytes of ``full_keys`` (prefix included) with one MGET; None when Redis is down or disabled.

        For other stores sharing this connection and its outage handling (``PublishedMarkers``).
        """
        if not full_keys or not self._usable():
            return None
        assert self._client is not None
        try:
            return list(self._client.mget(full_keys))
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return None

    def set_raw(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        """Store ``(full_key, bytes)`` pairs with ``ttl_s`` (one script call per 512 keys); nothing when Redis is down."""
        self._write_in_chunks(
            self._set_many, [key for key, _ in items], [value for _, value in items], 1, ttl_s
        )

    def set_ranges(self, items: Sequence[tuple[str, int, bytes]], ttl_s: int) -> None:
        """Write each ``(full_key, byte_offset, data)`` into its key (SETRANGE: the bytes around it are kept, a gap
        is zero bytes) and give the key ``ttl_s``; one script call per 512 ranges, nothing when Redis is down."""
        args: list[Any] = []
        for _, at, data in items:
            args += (at, data)
        self._write_in_chunks(self._set_ranges, [key for key, _, _ in items], args, 2, ttl_s)

    def _write_in_chunks(
        self, script: Any, keys: list[str], args: list[Any], per_key: int, ttl_s: int
    ) -> None:
        """Run a write ``script`` over ``keys`` (``per_key`` arguments each, in ``args``) with ``ttl_s`` first, one
        call per ``SET_MANY_CHUNK`` keys; an outage drops the writes, never raises."""
        if not keys or not self._usable():
            return
        try:
            for start in range(0, len(keys), SET_MANY_CHUNK):
                end = start + SET_MANY_CHUNK
                script(keys=keys[start:end], args=[ttl_s, *args[start * per_key : end * per_key]])
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)

    def get_ranges(self, items: Sequence[tuple[str, int, int]]) -> list[bytes] | None:
        """The bytes of each ``(full_key, first_byte, last_byte)`` (inclusive; fewer or none where the key is
        shorter or absent) in one script call; None when Redis is down or disabled."""
        if not items or not self._usable():
            return None
        assert self._client is not None
        args: list[int] = []
        for _, first, last in items:
            args += (first, last)
        try:
            return list(self._get_ranges(keys=[key for key, _, _ in items], args=args))
        except (redis.RedisError, OSError) as exc:
            self._mark_down(exc)
            return None

    def set_many(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store ``(key, value)`` pairs with the configured TTL (one round trip per 512 keys)."""
        self.set_raw([(self._prefix + key, orjson.dumps(value)) for key, value in items], self._ttl)

    def close(self) -> None:
        """Release the connection pool."""
        if self._client is not None:
            self._client.close()
