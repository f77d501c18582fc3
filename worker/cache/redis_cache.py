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
NEAR_MAX = 4096  # keys whose hit is kept in the near cache (``redis.near_cache_s``; cleared when full)
_UNPARSED: Any = object()


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
        self._near: dict[str, tuple[float, dict[str, Any]]] = {}  # key -> (kept until, value): recent hits
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
        """Cached values for ``keys`` (None for a miss) with one MGET of the distinct keys not in the near cache;
        a miss for each of those when Redis is down.

        Equal entries are parsed once and share one dict, within a call and across calls (up to ``PARSED_MAX``
        distinct entries are remembered): a wave of repeats reads the same entry hundreds of times in one call,
        and in every call after. A hit is kept ``redis.near_cache_s`` (the near cache): a wave's repeats within
        that time cost no round trip at all. Misses are never kept: a verdict stored meanwhile, by this process
        or another, is read at the next lookup. Callers read the values, never change them.
        """
        if not keys:
            return []
        # Each distinct key is read once: a wave repeats a few keys hundreds of times in one call.
        distinct = list(dict.fromkeys(keys))
        by_key: dict[str, dict[str, Any] | None] = {}
        ask = self._from_near(distinct, by_key) if self._near else distinct
        errors = 0
        if ask:
            raw = self.get_raw([self._prefix + k for k in ask])
            if raw is None:
                # Redis is down (or the cache disabled): what the near cache does not hold is a miss.
                by_key.update(dict.fromkeys(ask))
                if self.enabled:
                    asked = set(ask)
                    errors = sum(k in asked for k in keys)
                    metrics.CACHE_REQUESTS.labels(result="error").inc(errors)
            else:
                self._read(ask, raw, by_key)
        values = [by_key[k] for k in keys]
        hits = sum(v is not None for v in values)
        if hits:
            metrics.CACHE_REQUESTS.labels(result="hit").inc(hits)
        if len(values) - hits - errors:
            metrics.CACHE_REQUESTS.labels(result="miss").inc(len(values) - hits - errors)
        return values

    def _from_near(self, keys: list[str], into: dict[str, dict[str, Any] | None]) -> list[str]:
        """Put the near cache's live hits of ``keys`` into ``into``; the keys it does not hold."""
        near = self._near
        now = self._clock()
        ask = []
        for key in keys:
            kept = near.get(key)
            if kept is not None and kept[0] > now:
                into[key] = kept[1]
            else:
                ask.append(key)
        return ask

    def _read(self, keys: list[str], raw: list[bytes | None], into: dict[str, dict[str, Any] | None]) -> None:
        """Parse the entries ``raw`` read for ``keys`` into ``into`` (shared per equal entry), keeping hits near."""
        parsed = self._parsed
        if len(parsed) >= PARSED_MAX:
            parsed.clear()
        near_s = self._settings.near_cache_s
        near = self._near
        if near_s and len(near) + len(keys) > NEAR_MAX:
            near.clear()
        expires = self._clock() + near_s
        for key, blob in zip(keys, raw, strict=True):
            if blob is None:
                into[key] = None
                continue
            value = parsed.get(blob, _UNPARSED)
            if value is _UNPARSED:
                try:
                    loaded = orjson.loads(blob)
                except orjson.JSONDecodeError:
                    loaded = None  # a corrupt entry is a miss; the fresh verdict overwrites it
                value = parsed[blob] = loaded if isinstance(loaded, dict) else None
            into[key] = value
            if value is not None and near_s:
                near[key] = (expires, value)

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
        """Store ``(key, value)`` pairs with the configured TTL (one round trip per 512 keys); this process's near
        copies of those keys are dropped (the next lookup reads what was stored)."""
        for key, _ in items:
            self._near.pop(key, None)
        self.set_raw([(self._prefix + key, orjson.dumps(value)) for key, value in items], self._ttl)

    def close(self) -> None:
        """Release the connection pool."""
        if self._client is not None:
            self._client.close()
