"""Record bytes -> a normalized ``ChatEvent``, or a ``Rejection`` with a specific reason. Runs on every record.

Checks, in this order (the first failure wins): empty record or tombstone; size; UTF-8; JSON syntax and
duplicate keys; top level is an object; nesting depth; the chat-event schema (``schemas/chat_event.v1.json``,
compiled jsonschema-rs validator); then the conversation rules of ``schemas/README.md`` (dropped roles,
merging, first message, images, URL schemes, data URLs, limits, no text, policy id).

Duplicate keys: orjson (fast) keeps the last value silently. Every object member has exactly one ``:``
outside strings, and orjson never escapes ``:``. So when the raw record has no ``\\u003x`` escape, it has
duplicate keys exactly when it holds more ``:`` bytes than ``orjson.dumps`` of the parsed value does (the
lost members, and the strings inside them, carry the missing colons). That costs one C-level dump and two
byte counts — or only the dump and one comparison when the record is byte for byte that dump (a compact
producer's record, escapes included: nothing was lost); the slow, exact path (stdlib ``json`` with
``object_pairs_hook``) runs only for records with such escapes, records too deep for ``orjson.dumps``, and to
name the duplicate key of a rejected record.
``benchmarks/bench_decode.py`` measures the alternatives.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson

from worker.config import LimitsSettings, Settings
from worker.contracts.events import ChatEvent, ImageRef, Turn
from worker.contracts.rejections import Reason, RejectedError, Rejection
from worker.contracts.schemas import CHAT_EVENT, field_path, validator, validator_beside

logger = logging.getLogger(__name__)

# Not part of Llama Guard's conversation format: left out of the model's view and counted.
DROPPED_ROLES = frozenset({"system", "tool", "developer"})

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal, escapes included
_BRACKET_TABLE = bytes.maketrans(b"{[}]", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,31}):")
_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def decode_event(
    raw: bytes | bytearray | memoryview | str | None, settings: Settings
) -> ChatEvent | Rejection:
    """Decode, validate and normalize one record. Never raises for bad input: returns a ``Rejection``.

    ``Rejection.reason`` is a ``Reason`` code, ``.message`` one sentence naming the field or fault (never the
    message text), ``.field`` the offending path (``messages[2].content[0].type``) when there is one.
    """
    try:
        return _decode(raw, settings)
    except Exception as exc:  # a decoder bug must not stop the stream: the record is dead-lettered, loudly
        logger.exception("decoder failed on a record", extra={"stage": "decode"})
        return Rejection(
            Reason.INVALID_VALUE, f"the record could not be decoded (internal {type(exc).__name__})"
        )


def salvage_event_id(raw: bytes | None) -> str | None:
    """The record's ``event_id`` if one can be read at all (for dead letters of otherwise bad records)."""
    if not raw:
        return None
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    event_id = obj.get("event_id") if isinstance(obj, dict) else None
    return event_id if isinstance(event_id, str) else None


def event_to_dict(event: ChatEvent, *, abbreviate_data_urls: bool = True) -> dict[str, Any]:
    """The normalized event as plain data (what ``check-event`` prints); data URLs shortened by default."""

    def shown(ref: ImageRef) -> dict[str, Any]:
        url = ref.url
        if abbreviate_data_urls and ref.is_data_url:
            head, _, payload = url.partition(",")
            url = f"{head},...({len(payload)} base64 chars)"
        return {"url": url, "turn_index": ref.turn_index}

    image = shown(event.image) if event.image is not None else None
    return {
        "event_id": event.event_id,
        "conversation_id": event.conversation_id,
        "task": event.task.value,
        "created_at": event.created_at,
        "tenant": event.tenant,
        "policy": event.policy,
        "turns": [{"role": t.role, "texts": list(t.texts)} for t in event.turns],
        "image": image,
        "images": [shown(ref) for ref in event.images],
        "dropped_messages": event.dropped_messages,
        "merged_messages": event.merged_messages,
        "dropped_images": event.dropped_images,
        "metadata": event.extra,
    }


# --------------------------------------------------------------------------------------------------- stages


def _decode(raw: bytes | bytearray | memoryview | str | None, settings: Settings) -> ChatEvent | Rejection:
    limits = settings.limits
    if raw is None or len(raw) == 0:
        return Rejection(
            Reason.EMPTY_RECORD, "the record is empty (a null value or tombstone, or zero bytes)"
        )
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            return Rejection(
                Reason.INVALID_UTF8,
                f"the record is not valid UTF-8 (lone surrogate at character {exc.start})",
            )
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
    if len(raw) > limits.max_record_bytes:
        return Rejection(
            Reason.RECORD_TOO_LARGE,
            f"the record is {len(raw)} bytes, above limits.max_record_bytes ({limits.max_record_bytes})",
        )
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _json_error(raw, exc)
    duplicate = _duplicate_key(raw, obj)
    if duplicate is not None:
        return duplicate
    if not isinstance(obj, dict):
        return Rejection(
            Reason.NOT_AN_OBJECT, f"the record is {_json_type(obj)}, not a JSON object (a chat event)"
        )
    if _too_deep(raw, limits.max_json_depth):
        return Rejection(
            Reason.TOO_DEEPLY_NESTED,
            f"the record nests objects/arrays deeper than limits.max_json_depth ({limits.max_json_depth})",
        )
    # A wave repeats the same messages: when they are a remembered conversation's (checked against the whole
    # schema, under the same limits, when it was remembered), only the rest of the event is validated.
    seen = _messages_json(obj) if len(raw) <= REMEMBER_MAX_BYTES else None
    remembered = _conversations.get(seen) if seen is not None else None
    if remembered is not None and remembered[0] is limits:
        schema = validator_beside(CHAT_EVENT, "messages")
    else:
        schema, remembered = validator(CHAT_EVENT), None
    if not schema.is_valid(obj):
        return _schema_rejection(schema.iter_errors(obj))
    return _normalize(obj, settings, seen, remembered[1] if remembered is not None else None)


def _messages_json(obj: dict[str, Any]) -> bytes | None:
    """The event's messages as JSON, the key of a remembered conversation (None: too deep to encode)."""
    try:
        return orjson.dumps(obj.get("messages"))
    except orjson.JSONEncodeError:  # nested deeper than orjson.dumps allows: normalized every time
        return None


def _json_error(raw: bytes, exc: orjson.JSONDecodeError) -> Rejection:
    # orjson validates UTF-8 itself; decode only on this error path to tell the two faults apart.
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return Rejection(
            Reason.INVALID_UTF8, f"the record is not valid UTF-8 (invalid byte at offset {bad.start})"
        )
    if "depth limit" in str(exc):
        return Rejection(Reason.TOO_DEEPLY_NESTED, "the record nests objects/arrays too deeply to parse")
    return Rejection(Reason.INVALID_JSON, f"the record is not valid JSON: {exc.msg} at byte {exc.pos}")


class _PairsDict(dict[str, Any]):
    """A JSON object from the slow path that remembers the first key it saw twice."""

    duplicate: str | None = None


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _PairsDict:
    obj = _PairsDict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def _duplicate_key(raw: bytes, obj: Any) -> Rejection | None:
    """A ``duplicate_key`` rejection if any object in ``raw`` repeats a key (see the module docstring)."""
    try:
        encoded = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        encoded = None  # nested deeper than orjson.dumps allows: use the exact path
    if encoded is not None:
        # A compact record is often byte for byte the encoding of what it parsed to: then no member was lost.
        if encoded == raw:
            return None
        # memchr for a backslash first: most records have no escapes at all.
        if (b"\\" not in raw or b"\\u003" not in raw) and raw.count(b":") == encoded.count(b":"):
            return None
    try:
        tree = json.loads(raw, object_pairs_hook=_pairs_hook)
    except RecursionError:
        return Rejection(Reason.TOO_DEEPLY_NESTED, "the record nests objects/arrays too deeply to parse")
    except ValueError:
        return None  # stdlib json refuses what orjson accepted: orjson's reading stands
    found = _find_duplicate(tree)
    if found is None:
        return None
    path, key = found
    where = field_path([*path, key])
    return Rejection(
        Reason.DUPLICATE_KEY,
        f"{where} appears more than once in its object (JSON objects must not repeat keys)",
        where,
    )


def _find_duplicate(tree: Any) -> tuple[list[str | int], str] | None:
    queue: deque[tuple[Any, list[str | int]]] = deque([(tree, [])])  # breadth first: report the shallowest
    while queue:
        node, path = queue.popleft()
        if isinstance(node, _PairsDict):
            if node.duplicate is not None:
                return path, node.duplicate
            queue.extend((v, [*path, k]) for k, v in node.items() if isinstance(v, dict | list))
        elif isinstance(node, list):
            queue.extend((v, [*path, i]) for i, v in enumerate(node) if isinstance(v, dict | list))
    return None


def _too_deep(raw: bytes, limit: int) -> bool:
    """Whether the (valid JSON) record nests objects/arrays deeper than ``limit``, from its bytes alone.

    Strings are cut out, the brackets kept (``{[`` as ``(``, ``}]`` as ``)``); each pass of
    ``replace(b"()", b"")`` then removes exactly the innermost containers, so the depth is the number of
    passes that empties the string. All C-level byte operations: a hostile 8 MB record of two million
    small arrays costs milliseconds, where walking the parsed tree in Python costs seconds.
    """
    if raw.count(b"{") + raw.count(b"[") <= limit:  # fewer containers than the limit: cannot be deeper
        return False
    brackets = _JSON_STRING.sub(b"", raw).translate(_BRACKET_TABLE, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    return bool(brackets)


# --------------------------------------------------------------------------------------------------- schema


def _schema_rejection(errors: Iterator[Any]) -> Rejection:
    """Turn the first jsonschema-rs error into a specific reason and a sentence naming the field."""
    error = next(errors)
    kind = type(error.kind).__name__
    info = error.kind.as_dict()
    path: list[str | int] = list(error.instance_path)
    where = field_path(path) or "the event"
    last = path[-1] if path else None

    if kind == "Required":
        missing = field_path([*path, info["property"]])
        reason = Reason.MISSING_FIELD
        return Rejection(reason, f"{missing} is missing (required)", missing)
    if kind in ("AdditionalProperties", "UnevaluatedProperties"):
        extra = info.get("unexpected") or []
        name = field_path([*path, extra[0]]) if extra else where
        return Rejection(
            Reason.UNKNOWN_FIELD,
            f"{name} is not a field of a chat event v1 (producer extras belong in metadata)",
            name,
        )
    if kind == "Type":
        words = [_TYPE_WORDS.get(t, t) for t in sorted(info["types"], key=lambda t: t == "null")]
        expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
        return Rejection(
            Reason.WRONG_TYPE,
            f"{where} must be {expected}, not {_json_type(error.instance)}",
            field_path(path),
        )
    if kind in ("Enum", "Constant") and last == "role" and _in_message(path):
        return Rejection(
            Reason.UNKNOWN_ROLE,
            f"{where} is {_short(error.instance)}, not one of user, assistant, system, tool, developer",
            where,
        )
    if kind in ("Enum", "Constant") and last == "type" and _in_content_part(path):
        return Rejection(
            Reason.UNKNOWN_PART_TYPE,
            f"{where} is {_short(error.instance)}; only text and image_url parts are supported",
            where,
        )
    if kind == "MinItems" and path == ["messages"]:
        return Rejection(
            Reason.EMPTY_CONVERSATION,
            "messages is empty; a chat event needs at least one message",
            "messages",
        )
    if kind == "MinLength" and info.get("limit") == 1:
        return Rejection(Reason.INVALID_VALUE, f"{where} must not be empty", where)
    if kind == "MinItems":
        return Rejection(Reason.INVALID_VALUE, f"{where} must not be an empty list", where)
    if kind in ("Pattern", "Format") and last == "created_at":
        return Rejection(
            Reason.INVALID_VALUE, f"{where} is not an RFC 3339 date-time with a time zone", where
        )
    if kind in ("Enum", "Constant"):
        options = info.get("options") if kind == "Enum" else [info.get("expected_value")]
        supported = ", ".join(_short(o) for o in options or [])
        return Rejection(
            Reason.INVALID_VALUE,
            f"{where} has an unsupported value {_short(error.instance)}; supported: {supported}",
            where,
        )
    # Remaining keywords (maxLength, ...): jsonschema-rs's message names the limit, not the content.
    detail = error.message if kind != "MaxLength" else f"is longer than {info.get('limit')} characters"
    if len(detail) > 120:
        detail = detail[:120] + "..."
    return Rejection(Reason.INVALID_VALUE, f"{where} is invalid: {detail}", where)


_TYPE_WORDS = {
    "string": "a string",
    "array": "an array",
    "object": "an object",
    "null": "null",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
}


def _in_message(path: list[str | int]) -> bool:
    return len(path) == 3 and path[0] == "messages" and isinstance(path[1], int)


def _in_content_part(path: list[str | int]) -> bool:
    return len(path) == 5 and path[0] == "messages" and path[2] == "content" and isinstance(path[3], int)


# ---------------------------------------------------------------------------------------------- conversation


# Text-only conversations normalized per process, by their JSON and the limits they were checked under: a wave
# repeats the same messages with new ids. Cleared when full. Only records up to REMEMBER_MAX_BYTES are looked
# up: a larger one is mostly an image's data URL, which is never remembered, so its JSON is not written again.
CONVERSATIONS_REMEMBERED = 4096
REMEMBER_MAX_BYTES = 64 * 1024
_Conversation = tuple[tuple[Turn, ...], int, int]  # turns, dropped messages, merged messages
_conversations: dict[bytes, tuple[LimitsSettings, _Conversation]] = {}


def _normalize(
    obj: dict[str, Any], settings: Settings, seen: bytes | None, remembered: _Conversation | None
) -> ChatEvent | Rejection:
    """Apply the conversation rules of schemas/README.md to a schema-valid event: ``remembered`` is its
    conversation when it was remembered (under these limits), else ``seen`` (its messages' JSON, when they may
    be remembered) is the key it is remembered by."""
    messages: list[dict[str, Any]] = obj["messages"]
    policy = obj.get("policy")
    limits = settings.limits
    if remembered is not None:
        turns, dropped, merged = remembered
        refs: tuple[ImageRef, ...] = ()
        dropped_images = 0
    else:
        normalized = _conversation(messages, policy, settings)
        if isinstance(normalized, Rejection):
            return normalized
        turns, refs, dropped, merged, dropped_images = normalized
        if seen is not None and not refs and not dropped_images:
            if len(_conversations) >= CONVERSATIONS_REMEMBERED:
                _conversations.clear()
            _conversations[seen] = (limits, (turns, dropped, merged))
    if policy is not None and policy not in settings.policies:
        return Rejection(
            Reason.UNKNOWN_POLICY,
            f"policy {_short(policy)} is not one of the configured policies ({', '.join(sorted(settings.policies))})",
            "policy",
        )
    # Positional, in ChatEvent's field order: keywords cost about 1 µs more per event, and this runs for every one.
    return ChatEvent(
        obj["event_id"],
        obj["conversation_id"],
        turns,
        refs[-1] if refs else None,  # image
        obj.get("created_at"),
        obj.get("tenant"),
        policy,
        dropped,  # dropped_messages
        merged,  # merged_messages
        dropped_images,
        obj.get("metadata") or {},  # extra
        refs,  # images
    )


def _conversation(
    messages: list[dict[str, Any]], policy: str | None, settings: Settings
) -> tuple[tuple[Turn, ...], tuple[ImageRef, ...], int, int, int] | Rejection:
    """The conversation rules on ``messages``: (turns, kept images, dropped, merged, dropped images)."""
    limits = settings.limits
    if len(messages) > limits.max_messages:
        return Rejection(
            Reason.TOO_MANY_MESSAGES,
            f"messages holds {len(messages)} messages, above limits.max_messages ({limits.max_messages})",
            "messages",
        )
    roles: list[str] = []
    texts: list[list[str]] = []
    images: list[tuple[int, str, str, Any]] = []  # (turn index, url, field path, data: URL bytes)
    dropped = merged = total_chars = 0
    has_text = False
    max_text_chars = limits.max_text_chars
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role in DROPPED_ROLES or content is None:
            dropped += 1
            continue
        if not roles:
            if role != "user":
                return Rejection(
                    Reason.FIRST_MESSAGE_NOT_USER,
                    f"messages[{i}].role is {role}, but the conversation must start with a user message "
                    "(after system/tool/developer messages are dropped)",
                    f"messages[{i}].role",
                )
            roles.append(role)
            texts.append([])
        elif roles[-1] == role:
            if not limits.merge_consecutive_roles:
                return Rejection(
                    Reason.ROLES_NOT_ALTERNATING,
                    f"messages[{i}].role is {role} again (a second {role} message in a row); user and assistant must alternate "
                    "(limits.merge_consecutive_roles is off)",
                    f"messages[{i}].role",
                )
            merged += 1
        else:
            roles.append(role)
            texts.append([])
        turn = texts[-1]
        if isinstance(content, str):
            if len(content) > max_text_chars:
                return _text_too_long(f"messages[{i}].content", len(content), max_text_chars)
            total_chars += len(content)
            has_text = has_text or not content.isspace() and content != ""
            turn.append(content)
            continue
        for k, part in enumerate(content):
            if part["type"] == "text":
                text = part["text"]
                if len(text) > max_text_chars:
                    return _text_too_long(f"messages[{i}].content[{k}].text", len(text), max_text_chars)
                total_chars += len(text)
                has_text = has_text or not text.isspace() and text != ""
                turn.append(text)
                continue
            # Field paths are built only here and on rejection: this loop runs for every record.
            where = f"messages[{i}].content[{k}]"
            if role != "user":
                return Rejection(
                    Reason.IMAGE_IN_ASSISTANT_MESSAGE,
                    f"{where} is an image in an assistant message; the model reads images from user messages only",
                    where,
                )
            url = part["image_url"]["url"]
            url_field = f"{where}.image_url.url"
            checked = _check_image_url(url, url_field, settings)
            if isinstance(checked, Rejection):
                return checked
            images.append((len(roles) - 1, url, url_field, checked))
    if not roles:
        return Rejection(
            Reason.EMPTY_CONVERSATION,
            f"messages has no user or assistant message with content (all {len(messages)} are dropped: "
            "system/tool/developer roles or null content)",
            "messages",
        )
    if total_chars > limits.max_total_text_chars:
        return Rejection(
            Reason.TEXT_TOO_LONG,
            f"messages hold {total_chars} text characters in all, above limits.max_total_text_chars "
            f"({limits.max_total_text_chars})",
            "messages",
        )
    if not has_text:
        return Rejection(
            Reason.NO_TEXT,
            "messages contain no text (only images or blank text); the model needs text",
            "messages",
        )
    dropped_images = 0
    kept: list[tuple[int, str, str, Any]] = images
    if len(images) > 1:
        if reads_several_images(settings, policy):
            limit = limits.max_images_llama_guard_4
            if len(images) > limit:
                return Rejection(
                    Reason.TOO_MANY_IMAGES,
                    f"{images[limit][2]} is image {limit + 1}; Llama Guard 4 reads at most "
                    f"limits.max_images_llama_guard_4 ({limit}) images per conversation",
                    images[limit][2],
                )
        elif limits.multiple_images == "reject":
            return Rejection(
                Reason.TOO_MANY_IMAGES,
                f"{images[1][2]} is a second image; the model reads one image per conversation "
                "(limits.multiple_images = keep_last keeps the most recent one)",
                images[1][2],
            )
        else:
            kept = images[-1:]
            dropped_images = len(images) - 1
    refs = tuple(
        ImageRef(url=url, turn_index=turn_index, data=data, field_path=url_field)
        for turn_index, url, url_field, data in kept
    )
    turns = tuple(Turn(role=r, texts=tuple(t)) for r, t in zip(roles, texts, strict=True))  # type: ignore[arg-type]
    return turns, refs, dropped, merged, dropped_images


def reads_several_images(settings: Settings, policy_id: str | None) -> bool:
    """Whether the route of ``policy_id`` (None = the default policy) sends several-image events to a model.

    Only then are all of an event's images kept for the model (Llama Guard 4); otherwise a second image is
    rejected or dropped by ``limits.multiple_images`` (Llama Guard 3 Vision reads one). Every pool of a split
    deployment decides this from the same, whole routing config, so they agree on each event. An unknown
    policy id falls back to the default route here; it is rejected right after.
    """
    from worker.moderation.routing import Router

    if policy_id is None or policy_id not in settings.policies:
        policy_id = settings.default_policy
    return Router(settings).model_for(policy_id, 2) is not None


def _text_too_long(field: str, chars: int, limit: int) -> Rejection:
    return Rejection(
        Reason.TEXT_TOO_LONG, f"{field} has {chars} characters, above limits.max_text_chars ({limit})", field
    )


def _check_image_url(url: str, field: str, settings: Settings) -> Rejection | bytes | None:
    """Scheme and syntax of an image URL; fetching (and the SSRF guard) happens later, in worker.images.

    A valid data: URL gives its decoded bytes (validating them meant decoding them; they travel on the ImageRef).
    """
    scheme_match = _URL_SCHEME.match(url)
    if scheme_match is None:
        return Rejection(
            Reason.UNSUPPORTED_URL_SCHEME,
            f"{field} has no URL scheme; expected https://, http:// or data:",
            field,
        )
    scheme = scheme_match.group(1).lower()
    if scheme == "data":
        return _check_data_url(url, field, settings)
    if scheme not in ("http", "https"):
        return Rejection(
            Reason.UNSUPPORTED_URL_SCHEME,
            f"{field} uses the {_short(scheme)} scheme; only https://, http:// and data: image URLs are supported",
            field,
        )
    fetch = settings.image_fetch
    if scheme not in fetch.allowed_schemes:
        return Rejection(
            Reason.UNSUPPORTED_URL_SCHEME,
            f"{field} uses the {scheme} scheme, which image_fetch.allowed_schemes does not allow",
            field,
        )
    if not fetch.enabled:
        return Rejection(
            Reason.IMAGE_FETCH_DISABLED,
            f"{field} is an {scheme} URL but image fetching is disabled (image_fetch.enabled); use a data: URL",
            field,
        )
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    if not host:
        return Rejection(Reason.INVALID_VALUE, f"{field} is not a valid {scheme} URL (no host)", field)
    return None


def _check_data_url(url: str, field: str, settings: Settings) -> Rejection | bytes:
    from worker.images.data_url import data_url_bytes

    try:
        return data_url_bytes(
            url, settings.image_fetch.allowed_content_types, settings.limits.max_image_bytes
        )
    except RejectedError as exc:
        return Rejection(exc.rejection.reason, f"{field} {exc.rejection.message}", field)


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    """A quoted, length-capped rendering of an untrusted scalar (role names, keys, schemes) for messages."""
    scalar = isinstance(value, (str, int, float, bool)) or value is None
    text = orjson.dumps(value).decode() if scalar else _json_type(value)
    return text if len(text) <= limit else text[: limit - 4] + '..."'
