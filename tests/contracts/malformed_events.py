"""Malformed chat events, each with the reason code and field path the decoder must report.

Shared by the decoder tests and the ``check-event`` CLI test (one table, two entry points).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

import orjson

PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc000000301"
        "0100c9fe92ef0000000049454e44ae426082"
    )
).decode()


def event(**fields: Any) -> dict[str, Any]:
    """A valid one-message prompt event with ``fields`` replaced (``...`` removes a field)."""
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "conversation_id": "conv-1",
        "messages": [{"role": "user", "content": "hello"}],
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def raw(**fields: Any) -> bytes:
    """``event(**fields)`` as record bytes."""
    return orjson.dumps(event(**fields))


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    """A user message with content parts (strings become text parts)."""
    return {
        "role": "user",
        "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts],
    }


def image(url: str) -> dict[str, Any]:
    """An image_url content part."""
    return {"type": "image_url", "image_url": {"url": url}}


@dataclass(frozen=True)
class Case:
    """One malformed record and what the decoder must say about it."""

    name: str
    record: bytes | None
    reason: str
    field: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted overrides for load_settings


NESTED_JUNK = (
    b'{"event_id":"e","conversation_id":"c","messages":[],"metadata":' + b'{"a":' * 40 + b"1" + b"}" * 41
)
HUGE_NESTING = b"[" * 5000 + b"]" * 5000

CASES: list[Case] = [
    # Record level
    Case("tombstone", None, "empty_record"),
    Case("zero_bytes", b"", "empty_record"),
    Case(
        "record_too_large",
        raw(messages=[user("x" * 3000)]),
        "record_too_large",
        settings={"limits.max_record_bytes": 1024},
    ),
    Case("invalid_utf8", b'{"event_id":"caf\xe9","conversation_id":"c","messages":[]}', "invalid_utf8"),
    Case("truncated_json", b'{"event_id":"e","conversation_id":', "invalid_json"),
    Case("two_json_values", raw() + b" " + raw(), "invalid_json"),
    Case("nan_literal", b'{"event_id":"e","score":NaN}', "invalid_json"),
    Case("byte_order_mark", b"\xef\xbb\xbf" + raw(), "invalid_json"),
    Case(
        "duplicate_top_level_key",
        b'{"event_id":"a","event_id":"b","conversation_id":"c","messages":[]}',
        "duplicate_key",
        "event_id",
    ),
    Case(
        "duplicate_nested_key",
        b'{"event_id":"a","conversation_id":"c","messages":[{"role":"user","content":"x","role":"assistant"}]}',
        "duplicate_key",
        "messages[0].role",
    ),
    Case(
        "duplicate_key_with_escaped_colon",
        b'{"event_id":"a\\u003a","conversation_id":"c","conversation_id":"d","messages":[]}',
        "duplicate_key",
        "conversation_id",
    ),
    Case("json_array", b'[{"event_id":"e"}]', "not_an_object"),
    Case("json_string", b'"just a string"', "not_an_object"),
    Case("json_null", b"null", "not_an_object"),
    Case("deeply_nested_junk", NESTED_JUNK, "too_deeply_nested"),
    Case("absurdly_nested_arrays", HUGE_NESTING, "too_deeply_nested"),
    # Schema
    Case("missing_event_id", raw(event_id=...), "missing_field", "event_id"),
    Case("missing_conversation_id", raw(conversation_id=...), "missing_field", "conversation_id"),
    Case("missing_messages", raw(messages=...), "missing_field", "messages"),
    Case("event_id_number", raw(event_id=17), "wrong_type", "event_id"),
    Case("event_id_null", raw(event_id=None), "wrong_type", "event_id"),
    Case("event_id_empty", raw(event_id=""), "invalid_value", "event_id"),
    Case("event_id_too_long", raw(event_id="e" * 300), "invalid_value", "event_id"),
    Case("tenant_number", raw(tenant=7), "wrong_type", "tenant"),
    Case("messages_a_string", raw(messages="hello"), "wrong_type", "messages"),
    Case("messages_empty", raw(messages=[]), "empty_conversation", "messages"),
    Case("message_not_an_object", raw(messages=["hello"]), "wrong_type", "messages[0]"),
    Case("role_missing", raw(messages=[{"content": "hi"}]), "missing_field", "messages[0].role"),
    Case("content_missing", raw(messages=[{"role": "user"}]), "missing_field", "messages[0].content"),
    Case(
        "unknown_role",
        raw(messages=[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
        "unknown_role",
        "messages[1].role",
    ),
    Case(
        "role_not_a_string", raw(messages=[{"role": 1, "content": "a"}]), "unknown_role", "messages[0].role"
    ),
    Case(
        "content_a_number",
        raw(messages=[{"role": "user", "content": 42}]),
        "wrong_type",
        "messages[0].content",
    ),
    Case(
        "content_empty_list",
        raw(messages=[{"role": "user", "content": []}]),
        "invalid_value",
        "messages[0].content",
    ),
    Case(
        "unknown_part_type",
        raw(messages=[user("hi", {"type": "input_audio", "input_audio": {}})]),
        "unknown_part_type",
        "messages[0].content[1].type",
    ),
    Case(
        "part_without_type",
        raw(messages=[user({"text": "hi"})]),
        "missing_field",
        "messages[0].content[0].type",
    ),
    Case(
        "part_is_a_string",
        raw(messages=[{"role": "user", "content": ["hi"]}]),
        "wrong_type",
        "messages[0].content[0]",
    ),
    Case(
        "text_not_a_string",
        raw(messages=[user({"type": "text", "text": ["hi"]})]),
        "wrong_type",
        "messages[0].content[0].text",
    ),
    Case(
        "image_url_a_string",
        raw(messages=[user("hi", {"type": "image_url", "image_url": "https://a.example/x.png"})]),
        "wrong_type",
        "messages[0].content[1].image_url",
    ),
    Case(
        "image_url_without_url",
        raw(messages=[user("hi", {"type": "image_url", "image_url": {}})]),
        "missing_field",
        "messages[0].content[1].image_url.url",
    ),
    Case("unknown_top_level_field", raw(policy_id="strict"), "unknown_field", "policy_id"),
    Case("created_at_not_rfc3339", raw(created_at="23/11/2026"), "invalid_value", "created_at"),
    Case("created_at_impossible_date", raw(created_at="2026-02-30T10:00:00Z"), "invalid_value", "created_at"),
    Case("schema_version_2", raw(schema_version=2), "invalid_value", "schema_version"),
    # Conversation rules
    Case(
        "assistant_first",
        raw(messages=[{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "x"}]),
        "first_message_not_user",
        "messages[0].role",
    ),
    Case(
        "assistant_first_after_system",
        raw(messages=[{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hi!"}]),
        "first_message_not_user",
        "messages[1].role",
    ),
    Case(
        "not_alternating_without_merge",
        raw(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        "roles_not_alternating",
        "messages[1].role",
        {"limits.merge_consecutive_roles": False},
    ),
    Case(
        "only_system_messages",
        raw(messages=[{"role": "system", "content": "be nice"}]),
        "empty_conversation",
        "messages",
    ),
    Case(
        "two_images_in_one_message",
        raw(messages=[user("compare", image("https://a.example/1.png"), image("https://a.example/2.png"))]),
        "too_many_images",
        "messages[0].content[2].image_url.url",
    ),
    Case(
        "two_images_in_two_messages",
        raw(
            messages=[
                user("a", image(f"data:image/png;base64,{PNG_1PX}")),
                {"role": "assistant", "content": "ok"},
                user("b", image("https://a.example/2.png")),
            ]
        ),
        "too_many_images",
        "messages[2].content[1].image_url.url",
    ),
    Case(
        "image_in_assistant_message",
        raw(messages=[user("draw"), {"role": "assistant", "content": [image("https://a.example/c.png")]}]),
        "image_in_assistant_message",
        "messages[1].content[0]",
    ),
    Case(
        "data_url_bad_base64",
        raw(messages=[user("look", image("data:image/png;base64,iVBOR*w0KGgo="))]),
        "bad_data_url",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "data_url_bad_padding",
        raw(messages=[user("look", image("data:image/png;base64,iVBORw0KGgo"))]),
        "bad_data_url",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "data_url_not_an_image",
        raw(messages=[user("look", image(f"data:text/plain;base64,{PNG_1PX}"))]),
        "bad_data_url",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "data_url_not_base64",
        raw(messages=[user("look", image("data:image/svg+xml,<svg/>"))]),
        "bad_data_url",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "data_url_empty",
        raw(messages=[user("look", image("data:image/png;base64,"))]),
        "bad_data_url",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "data_url_too_large",
        raw(messages=[user("look", image("data:image/png;base64," + "A" * 4000))]),
        "image_too_large",
        "messages[0].content[1].image_url.url",
        {"limits.max_image_bytes": 1024},
    ),
    Case(
        "ftp_url",
        raw(messages=[user("look", image("ftp://files.example/a.png"))]),
        "unsupported_url_scheme",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "file_url",
        raw(messages=[user("look", image("file:///etc/passwd"))]),
        "unsupported_url_scheme",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "javascript_url",
        raw(messages=[user("look", image("javascript:alert(1)"))]),
        "unsupported_url_scheme",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "url_without_scheme",
        raw(messages=[user("look", image("images/cat.png"))]),
        "unsupported_url_scheme",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "http_when_only_https_allowed",
        raw(messages=[user("look", image("http://a.example/c.png"))]),
        "unsupported_url_scheme",
        "messages[0].content[1].image_url.url",
        {"image_fetch.allowed_schemes": ["https"]},
    ),
    Case(
        "https_when_fetch_disabled",
        raw(messages=[user("look", image("https://a.example/c.png"))]),
        "image_fetch_disabled",
        "messages[0].content[1].image_url.url",
        {"image_fetch.enabled": False},
    ),
    Case(
        "https_without_host",
        raw(messages=[user("look", image("https:///c.png"))]),
        "invalid_value",
        "messages[0].content[1].image_url.url",
    ),
    Case(
        "text_part_too_long",
        raw(messages=[user("x" * 101)]),
        "text_too_long",
        "messages[0].content[0].text",
        {"limits.max_text_chars": 100},
    ),
    Case(
        "string_content_too_long",
        raw(messages=[{"role": "user", "content": "x" * 101}]),
        "text_too_long",
        "messages[0].content",
        {"limits.max_text_chars": 100},
    ),
    Case(
        "total_text_too_long",
        raw(messages=[user("x" * 80), {"role": "assistant", "content": "y" * 80}]),
        "text_too_long",
        "messages",
        {"limits.max_total_text_chars": 150},
    ),
    Case(
        "too_many_messages",
        raw(messages=[{"role": r, "content": "m"} for r in ("user", "assistant", "user", "assistant")]),
        "too_many_messages",
        "messages",
        {"limits.max_messages": 3},
    ),
    Case("no_text_only_image", raw(messages=[user(image("https://a.example/c.png"))]), "no_text", "messages"),
    Case("no_text_only_blanks", raw(messages=[{"role": "user", "content": "  \n\t"}]), "no_text", "messages"),
    Case("unknown_policy", raw(policy="no-such-policy"), "unknown_policy", "policy"),
]
