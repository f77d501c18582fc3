"""Structured logs: one JSON object per line on stderr (or a readable text format for a terminal).

Every line has ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and ``msg``; fields passed with
``extra={...}`` are added as top-level keys — ``event_id``, ``stage``, ``reason``, ``worker``, ``topic``,
``partition``, ``offset`` and the like. Privacy rule: message text and image bytes never reach a log line.
Keys that carry content (``CONTENT_KEYS``: ``text``, ``content``, ``messages``, ``prompt``, ``image``, …)
are dropped unless ``logging.include_content`` is on (a debug option), and extras that are not plain
scalars are dropped too, so a whole event dict passed by mistake cannot leak. Passwords inside URLs
(``redis://user:password@host``) are masked in every message, field and traceback.

Usage::

    configure_logging(settings.logging, worker="gpu-0")
    log = logging.getLogger(__name__)
    log.warning("dead letter", extra={"event_id": eid, "stage": "decode", "reason": "invalid_json"})
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

from worker.config import LoggingSettings, mask_url_credentials

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime", "taskName"}
)
# Fields listed first (in this order) when present, so lines are easy to scan.
ORDERED_FIELDS: Final = ("event_id", "stage", "reason", "worker")
CONTENT_KEYS: Final = frozenset(
    {"text", "content", "contents", "message_text", "messages", "prompt", "image", "image_bytes", "images",
     "raw", "record", "body", "turns", "conversation"}
)  # fmt: skip
_SCALARS: Final = (str, int, float, bool, type(None))
_HANDLER_MARK: Final = "_moderation_worker_handler"


def _utc_timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extra_fields(record: logging.LogRecord, include_content: bool) -> dict[str, Any]:
    """The ``extra=`` fields of a record that may be logged: scalars, content keys only when allowed."""
    fields: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        if key in CONTENT_KEYS and not include_content:
            continue
        if not isinstance(value, _SCALARS):
            if not include_content:
                continue
            value = repr(value)
        fields[key] = mask_url_credentials(value) if isinstance(value, str) else value
    return fields


class JsonLineFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg``, then the extras."""

    def __init__(self, *, include_content: bool = False) -> None:
        super().__init__()
        self.include_content = include_content

    def format(self, record: logging.LogRecord) -> str:
        """One line of JSON (no trailing newline; the handler adds it)."""
        line: dict[str, Any] = {
            "ts": _utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": mask_url_credentials(record.getMessage()),
        }
        extras = _extra_fields(record, self.include_content)
        for key in ORDERED_FIELDS:
            if key in extras:
                line[key] = extras.pop(key)
        line.update(extras)
        if record.exc_info:
            line["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            line["exc"] = mask_url_credentials(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable: ``ts LEVEL logger: msg key=value ...`` (same privacy rule as the JSON format)."""

    def __init__(self, *, include_content: bool = False) -> None:
        super().__init__()
        self.include_content = include_content

    def format(self, record: logging.LogRecord) -> str:
        """One readable line, extras appended as ``key=value``."""
        extras = _extra_fields(record, self.include_content)
        ordered = [k for k in ORDERED_FIELDS if k in extras] + [k for k in extras if k not in ORDERED_FIELDS]
        tail = " ".join(f"{k}={extras[k]}" for k in ordered)
        message = mask_url_credentials(record.getMessage())
        text = f"{_utc_timestamp(record.created)} {record.levelname:<7} {record.name}: {message}"
        if tail:
            text = f"{text} {tail}"
        if record.exc_info:
            text = f"{text}\n{mask_url_credentials(self.formatException(record.exc_info))}"
        return text


class _WorkerNameFilter(logging.Filter):
    """Stamps ``worker`` on records that do not carry one (one name per process/actor)."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.worker
        return True


def configure_logging(
    settings: LoggingSettings | None = None,
    *,
    worker: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the worker's log handler on the root logger (replacing one installed earlier) and return it.

    ``settings`` is ``Settings.logging`` (level, ``json``/``text`` format, ``include_content``); ``worker``
    is stamped on every line that does not pass its own; ``stream`` defaults to ``sys.stderr``.
    Idempotent: calling it again (e.g. in a restarted Ray actor) does not duplicate lines.
    """
    settings = settings or LoggingSettings()
    formatter: logging.Formatter
    if settings.format == "json":
        formatter = JsonLineFormatter(include_content=settings.include_content)
    else:
        formatter = TextFormatter(include_content=settings.include_content)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    if worker:
        handler.addFilter(_WorkerNameFilter(worker))

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    # Library warnings (transformers' FutureWarnings and the like) become log lines, not raw stderr text.
    logging.captureWarnings(True)
    # Client libraries log every reconnect at INFO; their warnings are what an operator needs.
    for noisy in ("kafka", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.level)))
    return handler
