"""Cache keys: same content → same key; anything that changes the verdict → another key."""

import pytest

from worker.cache.keys import cache_key
from worker.contracts.events import ChatEvent, ImageRef, Turn
from worker.contracts.verdicts import ModelInfo
from worker.engine.policy import DEFAULT_CATEGORIES, Policy

MODEL = ModelInfo("tiny-guard", "abc123")
POLICY = Policy("default", DEFAULT_CATEGORIES, 0.5)


def event(*turns, event_id="e1", conversation_id="c1", image=None, tenant=None):
    return ChatEvent(
        event_id, conversation_id, tuple(Turn(r, tuple(t)) for r, t in turns), image=image, tenant=tenant
    )


USER_ONLY = (("user", ["how do I bake bread?"]),)


def test_ids_tenant_and_surrounding_whitespace_do_not_change_the_key():
    a = event(*USER_ONLY)
    b = event(("user", ["  how do I bake bread?\n"]), event_id="e2", conversation_id="c9", tenant="acme")
    assert cache_key(MODEL, POLICY, a, None) == cache_key(MODEL, POLICY, b, None)


@pytest.mark.parametrize(
    "other",
    [
        event(
            ("user", ["how do I bake bread"]),
        ),  # text differs
        event(
            ("user", ["how do I", "bake bread?"]),
        ),  # same characters, different parts
        event(("user", ["how do I bake bread?"]), ("assistant", ["sure"])),  # another task
    ],
)
def test_content_changes_the_key(other):
    assert cache_key(MODEL, POLICY, event(*USER_ONLY), None) != cache_key(MODEL, POLICY, other, None)


def test_text_cannot_forge_a_part_boundary():
    # naive concatenation would make these equal
    a = event(
        ("user", ['a", "b']),
    )
    b = event(
        ("user", ["a", "b"]),
    )
    assert cache_key(MODEL, POLICY, a, None) != cache_key(MODEL, POLICY, b, None)


def test_model_revision_and_policy_change_the_key():
    e = event(*USER_ONLY)
    base = cache_key(MODEL, POLICY, e, None)
    assert cache_key(ModelInfo("tiny-guard", "def456"), POLICY, e, None) != base
    assert cache_key(ModelInfo("other", "abc123"), POLICY, e, None) != base
    assert cache_key(MODEL, Policy("default", DEFAULT_CATEGORIES, 0.7), e, None) != base
    assert cache_key(MODEL, Policy("default", DEFAULT_CATEGORIES[:12], 0.5), e, None) != base
    # the policy id alone does not matter: same content, same verdicts
    assert cache_key(MODEL, Policy("renamed", DEFAULT_CATEGORIES, 0.5), e, None) == base


def test_image_hash_is_part_of_the_key_and_required_with_an_image():
    img = ImageRef("data:image/png;base64,AAAA", 0)
    e = event(*USER_ONLY, image=img)
    assert cache_key(MODEL, POLICY, e, "aa" * 32) != cache_key(MODEL, POLICY, e, "bb" * 32)
    assert cache_key(MODEL, POLICY, e, "aa" * 32) != cache_key(MODEL, POLICY, event(*USER_ONLY), None)
    with pytest.raises(ValueError):
        cache_key(MODEL, POLICY, e, None)
    with pytest.raises(ValueError):
        cache_key(MODEL, POLICY, event(*USER_ONLY), "aa" * 32)


def test_the_judging_model_name_and_family_change_the_key():
    e = event(*USER_ONLY)
    text_guard = ModelInfo("tiny-guard", "abc123", name="text", family="llama-guard-3-1b")
    vision = ModelInfo("tiny-guard", "abc123", name="vision", family="llama-guard-3-vision")
    assert cache_key(text_guard, POLICY, e, None) != cache_key(vision, POLICY, e, None)
    renamed = ModelInfo("tiny-guard", "abc123", name="text2", family="llama-guard-3-1b")
    assert cache_key(renamed, POLICY, e, None) != cache_key(text_guard, POLICY, e, None)


def test_a_remembered_text_key_is_the_key_computed_afresh_and_never_another_models_or_policys():
    from worker.cache import keys

    e = event(*USER_ONLY)
    first = cache_key(MODEL, POLICY, e, None)
    keys._text_keys.clear()
    assert cache_key(MODEL, POLICY, event(*USER_ONLY, event_id="e9"), None) == first  # computed afresh
    assert cache_key(MODEL, POLICY, e, None) == first  # remembered
    assert cache_key(ModelInfo("tiny-guard", "def456"), POLICY, e, None) != first
    assert cache_key(ModelInfo("tiny-guard", "abc123", name="other"), POLICY, e, None) != first
    assert cache_key(MODEL, Policy("default", DEFAULT_CATEGORIES, 0.7), e, None) != first
