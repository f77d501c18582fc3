"""The verdict cache key: everything that decides a verdict, and nothing else.

Key = SHA-256 over an unambiguous encoding (a JSON array, via orjson) of:
model id + revision + configured name + family, policy hash, task, the normalized conversation (each turn's role and its text
parts stripped of surrounding whitespace, exactly what the prompt renders), and the image's content
hash. The image hash is taken over the *encoded bytes* (as received / fetched), not the decoded pixels:
hashing bytes is cheap and happens before any decoding, so a cache hit skips image decoding entirely;
the price is that two encodings of the same picture get separate entries, which only costs a miss.

Event ids, conversation ids, timestamps and tenants are left out on purpose: they do not change what
the model sees, and leaving them out is what makes repeats hit.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import orjson

from worker.contracts.events import ChatEvent
from worker.contracts.verdicts import ModelInfo

if TYPE_CHECKING:
    from worker.engine.policy import Policy

KEY_VERSION = 2  # bump when the encoding below changes, so old entries are never misread
# Keys of text-only conversations remembered per process (a wave repeats the same conversation; cleared when full).
TEXT_KEYS_REMEMBERED = 4096
_text_keys: dict[tuple[object, ...], str] = {}
# The same keys by the identity of the model, policy and turns (each kept, so its id is not reused).
_same_turns: dict[tuple[int, int, int], tuple[object, ModelInfo, Policy, str]] = {}


def conversation_fingerprint(event: ChatEvent) -> list[list[object]]:
    """The conversation as the prompt renders it: ``[[role, [stripped text parts...]], ...]``."""
    return [[turn.role, [text.strip() for text in turn.texts]] for turn in event.turns]


def cache_key(model: ModelInfo, policy: Policy, event: ChatEvent, image_hash: str | None) -> str:
    """Hex SHA-256 identifying the verdict of ``event`` under ``policy`` by ``model`` (no prefix)."""
    if (event.image is None) != (image_hash is None):
        raise ValueError("image_hash must be given exactly when the event carries an image")
    remembered = None
    if image_hash is None:  # everything the key reads (the task follows from the turns), hashable
        # By the turns' identity first (decoding shares the turns of a remembered conversation: hashing and
        # comparing them costs more than the rest of the lookup), then by their value.
        same = _same_turns.get((id(model), id(policy), id(event.turns)))
        if same is not None and same[0] is event.turns and same[1] is model and same[2] is policy:
            return same[3]
        remembered = (model.id, model.revision, model.name, model.family, policy.hash, event.turns)
        key = _text_keys.get(remembered)
        if key is not None:
            _remember_same(model, policy, event, key)
            return key
    material = [
        KEY_VERSION,
        model.id,
        model.revision,
        model.name,
        model.family,
        policy.hash,
        event.task.value,
        conversation_fingerprint(event),
        image_hash,
    ]
    key = hashlib.sha256(orjson.dumps(material)).hexdigest()
    if remembered is not None:
        if len(_text_keys) >= TEXT_KEYS_REMEMBERED:
            _text_keys.clear()
        _text_keys[remembered] = key
        _remember_same(model, policy, event, key)
    return key


def _remember_same(model: ModelInfo, policy: Policy, event: ChatEvent, key: str) -> None:
    if len(_same_turns) >= TEXT_KEYS_REMEMBERED:
        _same_turns.clear()
    _same_turns[(id(model), id(policy), id(event.turns))] = (event.turns, model, policy, key)
