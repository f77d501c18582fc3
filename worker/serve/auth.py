"""Bearer API keys for the HTTP endpoints: who may call, for which tenant, and how often.

- Keys come from ``auth.keys`` in the configuration, each from exactly one of ``key`` (inline; tests),
  ``key_env`` or ``key_file`` — in Kubernetes a Secret mounted as a file or exposed as an environment
  variable. A key named by ``key_env``/``key_file`` that cannot be read is a ``ConfigError`` at start.
- The presented key is compared with every configured key by ``hmac.compare_digest`` over SHA-256 digests
  (equal lengths, constant time; no early exit on the first match), so timing says nothing about the keys.
- Keys are never logged: logs and errors name the key's configuration *name* only.
- Each key is bound to a tenant: its requests act for that tenant (the tenant's policies only).
- Each key has a token bucket (``requests_per_second``, ``burst``); an empty bucket answers 429 with
  ``Retry-After`` (whole seconds, rounded up). Buckets live in each Serve replica: with N replicas a key's
  budget is up to N times the configured one.

Auth off (``auth.enabled: false``, the default for local development) lets every request through as
no tenant, exactly as before keys existed.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from worker.config import AuthSettings, ConfigError

UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key's configuration name and its tenant (None when auth is off)."""

    key_name: str | None
    tenant: str | None


@dataclass(frozen=True, slots=True)
class Denied:
    """A refused request: status, reason code, sentence, and the ``Retry-After`` seconds of a 429."""

    status: int
    reason: str
    message: str
    retry_after_s: int | None = None


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; ``take()`` spends one or says how long to wait."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a token was spent; else the seconds until one is available (nothing spent)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _read_key(name: str, settings) -> str:
    if settings.key is not None:
        value = settings.key.get_secret_value()
    elif settings.key_env is not None:
        value = os.environ.get(settings.key_env, "")
        if not value:
            raise ConfigError(f"auth.keys.{name}.key_env: environment variable {settings.key_env} is not set")
    else:
        try:
            value = Path(settings.key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"auth.keys.{name}.key_file: cannot read {settings.key_file} ({exc.strerror})"
            ) from None
    if len(value) < 16:
        raise ConfigError(f"auth.keys.{name}: a key must have at least 16 characters")
    return value


class ApiKeys:
    """The configured keys (as digests), their tenants and buckets; ``check`` decides one request."""

    def __init__(self, settings: AuthSettings, tenants: Collection[str] = (), clock=time.monotonic) -> None:
        """Resolve every key's secret; ``ConfigError`` when auth is on without keys or a key's tenant is unknown.

        ``tenants``: the configured tenant ids (``settings.tenants``); a key acts for one of them.
        """
        self.enabled = settings.enabled
        self._keys: list[tuple[bytes, str, str]] = []  # (digest, name, tenant)
        self._buckets: dict[str, TokenBucket] = {}
        if not self.enabled:
            return
        if not settings.keys:
            raise ConfigError("auth.enabled needs at least one entry in auth.keys")
        for name, key in sorted(settings.keys.items()):
            if key.tenant not in tenants:
                raise ConfigError(
                    f"auth.keys.{name}.tenant: {key.tenant!r} is not among tenants {sorted(tenants)} "
                    "(a key may use only its tenant's policies)"
                )
            self._keys.append((_digest(_read_key(name, key)), name, key.tenant))
            self._buckets[name] = TokenBucket(key.requests_per_second, key.burst, clock)

    def check(self, authorization: str | None) -> Caller | Denied:
        """The caller for an ``Authorization`` header value, or why it is refused (401 or 429)."""
        if not self.enabled:
            return Caller(None, None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Denied(401, UNAUTHORIZED, "missing bearer API key (Authorization: Bearer <key>)")
        presented = _digest(token.strip())
        found: tuple[str, str] | None = None
        for digest, name, tenant in self._keys:  # every key compared: no early exit
            if hmac.compare_digest(presented, digest) and found is None:
                found = (name, tenant)
        if found is None:
            return Denied(401, UNAUTHORIZED, "invalid API key")
        name, tenant = found
        wait = self._buckets[name].take()
        if wait > 0.0:
            return Denied(
                429, RATE_LIMITED, f"request budget of API key {name!r} exhausted", max(1, math.ceil(wait))
            )
        return Caller(name, tenant)
