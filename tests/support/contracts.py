"""Schema checks of records in tests: every verdict and dead letter the worker builds must validate.

The product compiles the same schemas (``worker.contracts.schemas.validator``) to validate input; these raise
with the field path, for assertions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.contracts.schemas import CHAT_EVENT, DEAD_LETTER, VERDICT, field_path, schema_file, validator


def _validate(name: str, record: Mapping[str, Any]) -> None:
    compiled = validator(name)
    if compiled.is_valid(record):
        return
    error = next(iter(compiled.iter_errors(record)))
    where = field_path(error.instance_path) or "<record>"
    raise ValueError(f"{name} record does not match {schema_file(name).name} at {where}: {error.message}")


def validate_event(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field path if ``record`` does not match the chat-event schema.

    Schema only; the worker's full check (conversation rules, limits) is ``worker.contracts.decode.decode_event``.
    """
    _validate(CHAT_EVENT, record)


def validate_verdict(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field path if ``record`` does not match the verdict schema."""
    _validate(VERDICT, record)


def validate_dead_letter(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field path if ``record`` does not match the dead-letter schema."""
    _validate(DEAD_LETTER, record)
