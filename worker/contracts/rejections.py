"""Rejections: a bad input becomes a value with a machine-readable reason and one human sentence.

The reason codes are the ``reason`` enum of ``schemas/dead_letter.v1.json``; a test keeps the two equal. A
rejection becomes a dead letter on the stream (``worker.contracts.dead_letters``), an HTTP 4xx over HTTP and an
``INVALID`` line in ``check-event``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a record could not get a verdict. Documented in the README and the dead-letter schema."""

    # Record level
    EMPTY_RECORD = "empty_record"  # null value (tombstone) or zero bytes
    RECORD_TOO_LARGE = "record_too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    DUPLICATE_KEY = "duplicate_key"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    NOT_AN_OBJECT = "not_an_object"
    # Event shape (schema)
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_FIELD = "unknown_field"
    UNKNOWN_ROLE = "unknown_role"
    UNKNOWN_PART_TYPE = "unknown_part_type"
    # Conversation semantics
    EMPTY_CONVERSATION = "empty_conversation"
    FIRST_MESSAGE_NOT_USER = "first_message_not_user"
    ROLES_NOT_ALTERNATING = "roles_not_alternating"
    NO_TEXT = "no_text"
    TEXT_TOO_LONG = "text_too_long"
    TOO_MANY_MESSAGES = "too_many_messages"
    TOO_MANY_IMAGES = "too_many_images"
    IMAGE_IN_ASSISTANT_MESSAGE = "image_in_assistant_message"
    UNKNOWN_POLICY = "unknown_policy"
    UNKNOWN_TENANT = "unknown_tenant"  # tenants are configured and the event's tenant is not among them
    POLICY_NOT_ALLOWED = "policy_not_allowed"  # the event names a policy its tenant may not use
    # Images
    BAD_DATA_URL = "bad_data_url"
    UNSUPPORTED_URL_SCHEME = "unsupported_url_scheme"
    IMAGE_FETCH_DISABLED = "image_fetch_disabled"
    IMAGE_BLOCKED_ADDRESS = "image_blocked_address"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    IMAGE_FETCH_TIMEOUT = "image_fetch_timeout"
    IMAGE_TOO_MANY_REDIRECTS = "image_too_many_redirects"
    IMAGE_BAD_CONTENT_TYPE = "image_bad_content_type"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    IMAGE_UNDECODABLE = "image_undecodable"
    # Engine
    ENGINE_ERROR = "engine_error"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one input was refused, before it knows where it came from (becomes a DeadLetter at the edge)."""

    reason: Reason
    message: str  # one sentence naming the field or fault
    field: str | None = None  # JSON-pointer-ish path of the offending field, when there is one

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", Reason(self.reason))


class RejectedError(Exception):
    """Raised inside a stage to turn the current input into a Rejection (caught at the stage boundary)."""

    def __init__(self, reason: Reason, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.rejection = Rejection(reason, message, field)

    def with_field(self, field: str | None) -> RejectedError:
        """This rejection naming ``field`` (e.g. an image URL's place in the event) when it names none yet."""
        if field is None or self.rejection.field is not None:
            return self
        return RejectedError(self.rejection.reason, f"{field}: {self.rejection.message}", field)
