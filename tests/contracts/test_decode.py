"""decode_event: every malformed record gets a specific reason naming the field; valid ones normalize as
schemas/README.md documents."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from tests.contracts.malformed_events import CASES, PNG_1PX, Case, event, image, raw, user
from worker.config import Settings, load_settings
from worker.contracts import decode
from worker.contracts.decode import _duplicate_key, _too_deep, decode_event, event_to_dict, salvage_event_id
from worker.contracts.events import ChatEvent, ImageRef, Task, Turn
from worker.contracts.rejections import Reason, Rejection
from worker.contracts.schemas import SCHEMAS_DIR

DEFAULTS = load_settings(None)


def decoded(record: bytes | dict[str, Any], **overrides: Any) -> ChatEvent:
    """Decode a record that must be valid."""
    settings = load_settings(None, **overrides) if overrides else DEFAULTS
    result = decode_event(orjson.dumps(record) if isinstance(record, dict) else record, settings)
    assert isinstance(result, ChatEvent), result
    return result


# ------------------------------------------------------------------------------------------------ rejections


def test_the_malformed_table_covers_at_least_30_events_and_25_reasons_paths() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert len({c.reason for c in CASES}) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_malformed_event_is_rejected_with_a_specific_reason_naming_the_field(case: Case) -> None:
    settings = load_settings(None, **case.settings) if case.settings else DEFAULTS
    result = decode_event(case.record, settings)
    assert isinstance(result, Rejection), f"accepted: {result}"
    assert result.reason == Reason(case.reason), result
    assert result.field == case.field, result
    if case.field is not None:
        assert case.field in result.message  # the sentence names the field
    assert result.message and "\n" not in result.message and "internal" not in result.message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_malformed_event_whose_messages_were_seen_before_is_rejected_the_same_way(case: Case) -> None:
    """Messages of a remembered conversation are not validated again, the rest of the event is: each malformed
    record, after a valid event with the same messages was decoded, is rejected exactly as before."""
    settings = load_settings(None, **case.settings) if case.settings else DEFAULTS
    try:
        parsed = orjson.loads(case.record) if case.record else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and "messages" in parsed:
        seen = decode_event(
            orjson.dumps({"event_id": "e", "conversation_id": "c", "messages": parsed["messages"]}), settings
        )
        remembered = isinstance(seen, ChatEvent) and not seen.images
    else:
        remembered = False
    result = decode_event(case.record, settings)
    assert isinstance(result, Rejection), f"accepted: {result}"
    assert (result.reason, result.field) == (Reason(case.reason), case.field), result
    if case.name in REMEMBERED_MESSAGES_CASES:
        assert remembered, "this case's messages are a valid conversation: the shortcut was taken"


# Cases whose messages form a valid, remembered conversation: the rest of the event is what is wrong.
REMEMBERED_MESSAGES_CASES = {
    "unknown_top_level_field",
    "event_id_empty",
    "event_id_too_long",
    "tenant_number",
    "created_at_not_rfc3339",
    "created_at_impossible_date",
    "schema_version_2",
}


def test_rejection_messages_never_quote_message_text() -> None:
    secret = "my card number is 4111 1111 1111 1111"
    records = [
        raw(messages=[user(secret), {"role": "assistant", "content": [image("https://a.example/x.png")]}]),
        raw(messages=[user(secret + "x" * 200)]),
        raw(messages=[{"role": "assistant", "content": secret}]),
        raw(messages=[user(secret, {"type": "video", "text": secret})]),
    ]
    settings = load_settings(None, **{"limits.max_text_chars": 100})
    for record in records:
        result = decode_event(record, settings)
        assert isinstance(result, Rejection)
        assert "4111" not in result.message


def test_bytes_like_and_str_records_are_accepted_and_lone_surrogates_rejected() -> None:
    record = raw()
    for form in (bytearray(record), memoryview(record), record.decode()):
        assert isinstance(decode_event(form, DEFAULTS), ChatEvent)
    result = decode_event('{"event_id":"\ud800"}', DEFAULTS)
    assert isinstance(result, Rejection) and result.reason == Reason.INVALID_UTF8


def test_escaped_lone_surrogate_is_invalid_json() -> None:
    result = decode_event(b'{"event_id":"\\ud800","conversation_id":"c","messages":[]}', DEFAULTS)
    assert isinstance(result, Rejection) and result.reason == Reason.INVALID_JSON


# ------------------------------------------------------------------------------------------- normalization


def test_system_tool_developer_and_null_content_messages_are_dropped_and_counted() -> None:
    ev = decoded(
        event(
            messages=[
                {"role": "system", "content": "You are helpful."},
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "What's the weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        )
    )
    assert ev.turns == (Turn("user", ("What's the weather?",)), Turn("assistant", ("Sunny.",)))
    assert ev.dropped_messages == 4
    assert ev.merged_messages == 0
    assert ev.task == Task.RESPONSE


def test_consecutive_same_role_messages_merge_into_one_turn_in_order() -> None:
    ev = decoded(
        event(
            messages=[
                {"role": "user", "content": "part one"},
                {"role": "system", "content": "ignored"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "part two"}, {"type": "text", "text": "part three"}],
                },
                {"role": "assistant", "content": "a1"},
                {"role": "assistant", "content": "a2"},
            ]
        )
    )
    assert ev.turns == (Turn("user", ("part one", "part two", "part three")), Turn("assistant", ("a1", "a2")))
    assert ev.merged_messages == 2
    assert ev.dropped_messages == 1


def test_last_turn_decides_the_task() -> None:
    assert decoded(event()).task == Task.PROMPT
    both = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert decoded(event(messages=both)).task == Task.RESPONSE
    assert decoded(event(messages=[*both, {"role": "system", "content": "s"}])).task == Task.RESPONSE


def test_text_is_kept_as_given() -> None:
    ev = decoded(event(messages=[user("  padded\n", ""), {"role": "assistant", "content": "\tok "}]))
    assert ev.turns[0].texts == ("  padded\n", "")
    assert ev.turns[1].texts == ("\tok ",)


def test_one_image_becomes_an_image_ref_pointing_at_its_turn() -> None:
    url = f"data:image/png;base64,{PNG_1PX}"
    ev = decoded(
        event(
            messages=[
                {"role": "system", "content": "s"},
                user("first"),
                {"role": "assistant", "content": "ok"},
                user("look", image(url)),
            ]
        )
    )
    assert ev.image == ImageRef(url=url, turn_index=2)
    assert ev.turns[2] == Turn("user", ("look",))
    assert ev.image.is_data_url


def test_keep_last_keeps_the_most_recent_user_image_and_counts_the_others() -> None:
    record = event(
        messages=[
            user("a", image("https://a.example/1.png")),
            {"role": "assistant", "content": "ok"},
            user("b", image("https://a.example/2.png")),
            user("c", image(f"data:image/jpeg;base64,{PNG_1PX}")),  # merged into turn 2
        ]
    )
    ev = decoded(record, **{"limits.multiple_images": "keep_last"})
    assert ev.image == ImageRef(url=f"data:image/jpeg;base64,{PNG_1PX}", turn_index=2)
    assert ev.image.data == base64.b64decode(PNG_1PX)  # validated by decoding: the bytes travel on
    assert ev.dropped_images == 2
    assert ev.merged_messages == 1


def test_keep_last_still_refuses_a_bad_url_among_the_dropped_images() -> None:
    record = raw(messages=[user("a", image("ftp://a.example/1.png"), image("https://a.example/2.png"))])
    result = decode_event(record, load_settings(None, **{"limits.multiple_images": "keep_last"}))
    assert isinstance(result, Rejection) and result.reason == Reason.UNSUPPORTED_URL_SCHEME


def test_optional_fields_and_metadata_are_carried() -> None:
    ev = decoded(
        event(
            created_at="2026-11-23T12:00:00.5+01:00",
            tenant="acme",
            policy="default",
            metadata={"request": "r1"},
            schema_version=1,
        )
    )
    assert (ev.created_at, ev.tenant, ev.policy, ev.extra) == (
        "2026-11-23T12:00:00.5+01:00",
        "acme",
        "default",
        {"request": "r1"},
    )
    nulls = decoded(event(created_at=None, tenant=None, policy=None, metadata=None))
    assert (nulls.created_at, nulls.tenant, nulls.policy, nulls.extra) == (None, None, None, {})


def test_gateway_extras_on_messages_and_parts_are_ignored() -> None:
    ev = decoded(
        event(
            messages=[
                {
                    "role": "user",
                    "name": "alice",
                    "content": [
                        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://a.example/x.png", "detail": "high"},
                        },
                    ],
                },
                {"role": "assistant", "content": "hello", "refusal": None},
            ]
        )
    )
    assert ev.turns[0].texts == ("hi",) and ev.image is not None


def test_policy_must_be_configured() -> None:
    settings = Settings(policies={"default": {}, "strict": {"threshold": 0.2}})
    assert isinstance(decode_event(raw(policy="strict"), settings), ChatEvent)
    assert isinstance(decode_event(raw(policy="strict"), DEFAULTS), Rejection)


def test_event_to_dict_abbreviates_data_urls() -> None:
    ev = decoded(event(messages=[user("look", image(f"data:image/png;base64,{PNG_1PX}"))]))
    shown = event_to_dict(ev)
    assert shown["image"] == {
        "url": f"data:image/png;base64,...({len(PNG_1PX)} base64 chars)",
        "turn_index": 0,
    }
    assert event_to_dict(ev, abbreviate_data_urls=False)["image"]["url"].endswith(PNG_1PX)
    assert shown["turns"] == [{"role": "user", "texts": ["look"]}] and shown["task"] == "prompt"


def test_salvage_event_id_reads_ids_of_bad_records() -> None:
    assert salvage_event_id(raw(messages=[])) == "evt-1"
    assert salvage_event_id(b"[1]") is None
    assert salvage_event_id(None) is None
    assert salvage_event_id(b"\xff") is None


def test_schema_examples_decode_as_their_folder_says() -> None:
    examples = SCHEMAS_DIR / "examples" / "chat_event"
    valid = sorted((examples / "valid").glob("*.json"))
    assert len(valid) >= 3
    for path in valid:
        assert isinstance(decode_event(path.read_bytes(), DEFAULTS), ChatEvent), path.name
    rejected = sorted((examples / "rejected").glob("*.json"))
    assert len(rejected) >= 5
    for path in rejected:
        result = decode_event(path.read_bytes(), DEFAULTS)
        assert isinstance(result, Rejection) and result.reason.value == path.stem, (path.name, result)


# ------------------------------------------------------------------------------------- duplicate keys, fuzz

_keys = st.sampled_from(["a", "b", "c:d", "role", "ü", ":", 'x"[{', "\\"])
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(alphabet='ab:\\"é []{}', max_size=6)
)


def _json_trees() -> st.SearchStrategy[Any]:
    """JSON values whose objects are pair lists, so that they can hold duplicate keys."""
    return st.recursive(
        _scalars,
        lambda inner: st.lists(inner, max_size=4) | st.lists(st.tuples(_keys, inner), max_size=4).map(_Pairs),
        max_leaves=12,
    )


class _Pairs(list):  # type: ignore[type-arg]
    """An object written as its (key, value) pairs, duplicates allowed."""


def _encode(node: Any, escape_colons: bool, compact: bool = False) -> str:
    """``compact``: no spaces and raw UTF-8, as orjson writes (a record without duplicates then equals the
    encoding of its parse)."""

    def string(s: str) -> str:
        text = json.dumps(s, ensure_ascii=not compact)
        return text.replace(":", "\\u003a") if escape_colons else text

    colon = ":" if compact else " : "
    if isinstance(node, _Pairs):
        return (
            "{" + ",".join(f"{string(k)}{colon}{_encode(v, escape_colons, compact)}" for k, v in node) + "}"
        )
    if isinstance(node, list):
        return "[" + ",".join(_encode(v, escape_colons, compact) for v in node) + "]"
    return string(node) if isinstance(node, str) else json.dumps(node)


def _has_duplicates(node: Any) -> bool:
    if isinstance(node, _Pairs):
        keys = [k for k, _ in node]
        return len(keys) != len(set(keys)) or any(_has_duplicates(v) for _, v in node)
    if isinstance(node, list):
        return any(_has_duplicates(v) for v in node)
    return False


@hyp_settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_json_trees(), escape_colons=st.booleans(), compact=st.booleans())
def test_duplicate_key_detection_is_exact(tree: Any, escape_colons: bool, compact: bool) -> None:
    record = _encode(tree, escape_colons, compact).encode()
    found = _duplicate_key(record, orjson.loads(record))
    assert (found is not None) == _has_duplicates(tree), record
    if found is not None:
        assert found.reason == Reason.DUPLICATE_KEY


def _depth(node: Any) -> int:
    if isinstance(node, _Pairs):
        return 1 + max((_depth(v) for _, v in node), default=0)
    if isinstance(node, list):
        return 1 + max((_depth(v) for v in node), default=0)
    return 0


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_json_trees(), limit=st.integers(1, 6))
def test_nesting_depth_check_is_exact_despite_brackets_in_strings(tree: Any, limit: int) -> None:
    record = _encode(tree, escape_colons=False).encode()
    assert _too_deep(record, limit) == (_depth(tree) > limit), record


def test_a_compact_record_repeating_a_key_with_the_same_value_is_still_a_duplicate() -> None:
    """Its parse encodes to the record without the repeat: the byte-for-byte shortcut must not accept it."""
    record = b'{"a":1,"a":1}'
    assert orjson.dumps(orjson.loads(record)) != record
    found = _duplicate_key(record, orjson.loads(record))
    assert found is not None and found.reason == Reason.DUPLICATE_KEY
    assert _duplicate_key(b'{"a":1,"b":[{"c":"d:e"}]}', orjson.loads(b'{"a":1,"b":[{"c":"d:e"}]}')) is None


@hyp_settings(max_examples=300, deadline=None)
@given(record=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(record: bytes) -> None:
    result = decode_event(record, DEFAULTS)
    assert isinstance(result, Rejection | ChatEvent)
    if isinstance(result, Rejection):
        assert "internal" not in result.message


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event_id",
                    "conversation_id",
                    "messages",
                    "role",
                    "content",
                    "type",
                    "text",
                    "image_url",
                    "url",
                    "policy",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@hyp_settings(max_examples=300, deadline=None)
@given(value=_json_values)
def test_arbitrary_json_shapes_get_a_verdict_path_or_a_reason(value: Any) -> None:
    result = decode_event(json.dumps(value).encode(), DEFAULTS)  # json: also ints beyond 64 bits
    assert isinstance(result, Rejection | ChatEvent)
    if isinstance(result, Rejection):
        assert "internal" not in result.message, result


def test_a_repeated_conversation_decodes_as_the_first_time_with_its_own_ids_and_under_its_own_limits():
    """Normalized conversations are remembered per process (a wave repeats them); ids, metadata and the
    limits in force are not."""
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a long-ish question about bread"},
        {"role": "assistant", "content": "sure"},
    ]
    first = decode_event(raw(messages=messages, event_id="w-1", metadata={"n": 1}), DEFAULTS)
    again = decode_event(
        raw(messages=messages, event_id="w-2", conversation_id="c-2", tenant="acme"), DEFAULTS
    )
    assert isinstance(first, ChatEvent) and isinstance(again, ChatEvent)
    assert (again.event_id, again.conversation_id, again.tenant, again.extra) == ("w-2", "c-2", "acme", {})
    assert again.turns == first.turns and again.dropped_messages == first.dropped_messages == 1
    strict = load_settings(None, **{"limits.max_text_chars": 10})
    rejected = decode_event(raw(messages=messages, event_id="w-3"), strict)
    assert isinstance(rejected, Rejection) and rejected.reason is Reason.TEXT_TOO_LONG
    unknown = decode_event(raw(messages=messages, policy="nope"), DEFAULTS)
    assert isinstance(unknown, Rejection) and unknown.reason is Reason.UNKNOWN_POLICY
    with_image = [user("look", image(f"data:image/png;base64,{PNG_1PX}"))]
    for event_id in ("i-1", "i-2"):
        decoded = decode_event(raw(messages=with_image, event_id=event_id), DEFAULTS)
        assert (
            isinstance(decoded, ChatEvent)
            and decoded.image is not None
            and decoded.image.data == base64.b64decode(PNG_1PX)
        )


def test_only_records_up_to_the_bound_are_remembered():
    """A large record is mostly an image's data URL (never remembered): its messages are not written again
    as JSON to look them up."""
    small = [{"role": "user", "content": "remember me"}]
    large = [user(*["x" * 30_000] * 3)]  # text parts within the limits, the record above the bound
    assert len(raw(messages=large)) > decode.REMEMBER_MAX_BYTES
    decode._conversations.clear()
    for messages in (small, large):
        assert isinstance(decode_event(raw(messages=messages), DEFAULTS), ChatEvent)
    assert list(decode._conversations) == [orjson.dumps(small)]
