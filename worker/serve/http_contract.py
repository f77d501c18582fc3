"""The HTTP contract of ``POST /v1/moderate``, as plain functions (no Ray, no web framework).

A request body is one chat event (``schemas/chat_event.v1.json``) or a JSON array of them. Each event
goes through ``worker.contracts.decode.decode_event`` — the very check the stream applies to a Kafka record —
so a bad event gets the same reason code over HTTP as in a dead letter. Errors answer with::

    {"error": {"status": 422, "reason": "unknown_role", "message": "...", "field": "[1].messages[0].role",
               "index": 1},
     "errors": [ ...every failing event, same shape... ]}

Status codes: 413 body, batch or image pixels too large, 415 not JSON, 400 unreadable JSON (record-level
reasons), 422 a readable event that breaks the schema or the conversation rules (and image failures),
500 the engine failed on an event, 503 the replica is still loading its model, 404/405 no such route or
method (same shape, reasons ``not_found`` / ``method_not_allowed``); with API keys (``worker.serve.auth``)
401 ``unauthorized``, 403 ``forbidden`` / ``policy_not_allowed``, 429 ``rate_limited`` (with ``Retry-After``).
The reasons that exist only over HTTP (no Kafka record can have them): ``unsupported_media_type``,
``too_many_events``, ``too_many_pixels``, ``not_ready``, ``not_found``, ``method_not_allowed`` and the auth
reasons.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.config import ServeSettings, Settings
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Reason, Rejection

UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
TOO_MANY_EVENTS = "too_many_events"
TOO_MANY_PIXELS = "too_many_pixels"
NOT_READY = "not_ready"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
_HTTP_ONLY_STATUS = {TOO_MANY_PIXELS: 413, NOT_READY: 503, NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405}

# Record-level reasons: the body could not be read as JSON at all.
_BAD_REQUEST_REASONS = frozenset(
    {
        Reason.EMPTY_RECORD,
        Reason.INVALID_UTF8,
        Reason.INVALID_JSON,
        Reason.DUPLICATE_KEY,
        Reason.TOO_DEEPLY_NESTED,
    }
)

# Who may call (worker.serve.auth): bad or missing key, a tenant's policy boundary, an exhausted budget.
_AUTH_STATUS = {"unauthorized": 401, "forbidden": 403, Reason.POLICY_NOT_ALLOWED: 403, "rate_limited": 429}


def status_for(reason: Reason | str) -> int:
    """The HTTP status of a rejection reason (see module docstring)."""
    if reason in _HTTP_ONLY_STATUS:
        return _HTTP_ONLY_STATUS[str(reason)]
    if reason in (Reason.RECORD_TOO_LARGE, TOO_MANY_EVENTS):
        return 413
    if reason == UNSUPPORTED_MEDIA_TYPE:
        return 415
    if reason in _BAD_REQUEST_REASONS:
        return 400
    if reason == Reason.ENGINE_ERROR:
        return 500
    if reason in _AUTH_STATUS:
        return _AUTH_STATUS[reason]
    return 422


@dataclass(frozen=True, slots=True)
class RequestError:
    """One reason a request (or one event of it) gets no verdict."""

    reason: str
    message: str
    field: str | None = None
    index: int | None = None  # position in a batch request; None for a single-event body

    @property
    def status(self) -> int:
        return status_for(self.reason)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "reason": str(self.reason), "message": self.message}
        body["field"] = self.field
        if self.index is not None:
            body["index"] = self.index
        return body


def error_body(errors: list[RequestError]) -> tuple[int, dict[str, Any]]:
    """Status and JSON body for failed events: the first error decides the status, all are listed."""
    first = errors[0]
    return first.status, {"error": first.as_dict(), "errors": [e.as_dict() for e in errors]}


def from_rejection(rejection: Rejection, index: int | None) -> RequestError:
    """A decode/engine ``Rejection`` as a request error; in a batch the field is prefixed by ``[index]``."""
    where = rejection.field
    if index is not None:
        where = f"[{index}]" + ("" if not where else where if where.startswith("[") else f".{where}")
    return RequestError(rejection.reason.value, rejection.message, where, index)


def from_http_status(status: int, detail: str, method: str, path: str) -> RequestError:
    """A framework-level error (no route, wrong method…) as a request error of the same shape as the others."""
    if status == 404:
        return RequestError(
            NOT_FOUND, f"no route {path}; the API is POST /v1/moderate, GET /healthz, GET /readyz"
        )
    if status == 405:
        return RequestError(METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
    return _StatusError(f"http_{status}", detail, status_code=status)


@dataclass(frozen=True, slots=True)
class _StatusError(RequestError):
    """A framework error whose status is given, not derived from a reason."""

    status_code: int = 500

    @property
    def status(self) -> int:
        return self.status_code


def request_pixels_error(images: Sequence[bytes | None], serve: ServeSettings) -> RequestError | None:
    """413 when the images of one request declare more pixels in all than ``serve.max_request_image_pixels``.

    Only image headers are read: a request of huge images is refused before any of them costs a decode.
    """
    from worker.images.decode import declared_pixels

    total = sum(declared_pixels(data) for data in images if data)
    if total <= serve.max_request_image_pixels:
        return None
    return RequestError(
        TOO_MANY_PIXELS,
        f"the request's images declare {total} pixels in all, above serve.max_request_image_pixels "
        f"({serve.max_request_image_pixels})",
    )


class PixelBudget:
    """How many image pixels may be decoding at once in a replica; an image waits until its pixels fit.

    An image larger than the whole budget still runs, alone (its size is already bounded by
    ``limits.max_image_pixels``). Waiters are served in arrival order as room frees up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._changed: asyncio.Condition | None = None

    @asynccontextmanager
    async def hold(self, data: bytes) -> AsyncIterator[int]:
        """Hold the declared pixels of ``data`` for the duration of the block."""
        from worker.images.decode import declared_pixels

        pixels = min(declared_pixels(data), self.limit)
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            await changed.wait_for(lambda: self.in_use == 0 or self.in_use + pixels <= self.limit)
            self.in_use += pixels
        try:
            yield pixels
        finally:
            async with changed:
                self.in_use -= pixels
                changed.notify_all()


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or any ``application/*+json``, parameters (charset) ignored."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


@dataclass
class ParsedRequest:
    """The events of a request body and the errors of those that failed, by position."""

    batch: bool  # the body was an array: answer with an array
    events: list[ChatEvent | None] = field(default_factory=list)  # None where errors has the reason
    errors: list[RequestError] = field(default_factory=list)


def parse_request(body: bytes, settings: Settings) -> ParsedRequest:
    """Split ``body`` into events with ``decode_event`` (single object or array), collecting every error.

    An array is parsed once to find its items, and each item is re-encoded and decoded exactly like a
    Kafka record, so limits and reason codes match the stream. An object body is decoded as is.
    """
    from worker.contracts.decode import decode_event

    if body.lstrip()[:1] != b"[":
        decoded = decode_event(body, settings)
        if isinstance(decoded, Rejection):
            return ParsedRequest(batch=False, events=[None], errors=[from_rejection(decoded, None)])
        return ParsedRequest(batch=False, events=[decoded])
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError:
        # The record decoder names the fault as it does for a Kafka record (invalid_utf8, too_deeply_nested…).
        decoded = decode_event(body, settings)
        rejection = (
            decoded
            if isinstance(decoded, Rejection)
            else Rejection(Reason.INVALID_JSON, "body is not valid JSON")
        )
        return ParsedRequest(batch=True, errors=[from_rejection(rejection, None)])
    if not items:
        return ParsedRequest(
            batch=True, errors=[RequestError(Reason.INVALID_VALUE.value, "the event list is empty", "")]
        )
    limit = settings.serve.max_events_per_request
    if len(items) > limit:
        message = f"{len(items)} events in one request, above the limit of {limit}"
        return ParsedRequest(batch=True, errors=[RequestError(TOO_MANY_EVENTS, message, "")])
    parsed = ParsedRequest(batch=True)
    for index, item in enumerate(items):
        decoded = decode_event(orjson.dumps(item), settings)
        if isinstance(decoded, Rejection):
            parsed.events.append(None)
            parsed.errors.append(from_rejection(decoded, index))
        else:
            parsed.events.append(decoded)
    return parsed
