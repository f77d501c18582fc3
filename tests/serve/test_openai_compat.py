"""The OpenAI moderation shape: request parsing and the documented category mapping (no server needed)."""

from __future__ import annotations

import orjson
import pytest

from worker.config import CATEGORY_CODES, OPENAI_CATEGORY_NAMES, load_settings
from worker.serve.openai_compat import OPENAI_CATEGORIES, openai_result, parse_moderation_request

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
SETTINGS = load_settings(None)


def parse(body: object):
    return parse_moderation_request(orjson.dumps(body), SETTINGS)


def test_a_string_is_one_user_message() -> None:
    parsed = parse({"input": "hello", "model": "omni-moderation-latest"})
    assert not parsed.errors and len(parsed.events) == 1
    assert parsed.events[0].turns[0].role == "user" and parsed.events[0].turns[0].texts == ("hello",)
    assert parsed.input_types == [["text"]]


def test_a_list_of_strings_is_one_input_each() -> None:
    parsed = parse({"input": ["a", "b", "c"]})
    assert [e.turns[0].texts for e in parsed.events] == [("a",), ("b",), ("c",)]
    assert len({e.event_id for e in parsed.events}) == 3


def test_a_list_of_parts_is_one_multimodal_input() -> None:
    parsed = parse(
        {"input": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG}}]}
    )
    assert not parsed.errors and len(parsed.events) == 1 and parsed.events[0].image is not None
    assert parsed.input_types == [["text", "image"]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"model": "x"}, "missing_field"),
        ({"input": 3}, "wrong_type"),
        ({"input": []}, "wrong_type"),
        ({"input": ["a", 1]}, "wrong_type"),
        ({"input": "a", "model": 5}, "wrong_type"),
        ({"input": "a", "temperature": 1}, "unknown_field"),
        ({"input": "a", "policy": "nope"}, "unknown_policy"),
        ({"input": [{"type": "audio", "audio": {}}]}, "unknown_part_type"),
        ({"input": [{"type": "image_url", "image_url": {"url": PNG}}]}, "no_text"),
        ({"input": ["x"] * 65}, "too_many_events"),
    ],
)
def test_bad_requests_get_the_project_s_reason_codes(body: object, reason: str) -> None:
    parsed = parse(body)
    assert parsed.errors and parsed.errors[0].reason == reason


def test_every_code_has_a_documented_mapping_onto_openai_names() -> None:
    assert set(OPENAI_CATEGORIES) == set(CATEGORY_CODES)
    assert {n for names in OPENAI_CATEGORIES.values() for n in names} <= set(OPENAI_CATEGORY_NAMES)


def verdict(categories, scores=None, flagged=True, **extra):
    return {
        "flagged": flagged,
        "categories": [{"code": c, "name": c} for c in categories],
        "category_scores": scores,
        **extra,
    }


def test_a_code_sets_its_openai_names_and_its_own_key() -> None:
    scores = {c: 0.0 for c in CATEGORY_CODES} | {"S9": 0.7, "S1": 0.2}
    result = openai_result(verdict(["S9"], scores), ["text"])
    assert result["flagged"] is True
    assert (
        result["categories"]["S9"]
        and result["categories"]["illicit/violent"]
        and result["categories"]["violence"]
    )
    assert not result["categories"]["hate"] and not result["categories"]["S1"]
    # An OpenAI name scores the highest of its codes.
    assert result["category_scores"]["violence"] == 0.7 and result["category_scores"]["S1"] == 0.2
    assert set(OPENAI_CATEGORY_NAMES) | set(CATEGORY_CODES) == set(result["categories"])
    assert result["category_applied_input_types"]["violence"] == ["text"]


def test_finer_openai_names_the_taxonomy_does_not_separate_stay_false() -> None:
    result = openai_result(verdict(list(CATEGORY_CODES), {c: 0.5 for c in CATEGORY_CODES}), ["text", "image"])
    for name in (
        "harassment/threatening",
        "hate/threatening",
        "self-harm/intent",
        "self-harm/instructions",
        "violence/graphic",
    ):
        assert result["categories"][name] is False and result["category_scores"][name] == 0.0
    assert result["category_applied_input_types"]["sexual"] == ["text", "image"]


def test_a_custom_blocklist_category_maps_through_configuration() -> None:
    halted = verdict(["spam"], None, blocklist={"halted": True, "hits": []})
    result = openai_result(halted, ["text"], {"spam": ["illicit"]})
    assert result["categories"]["spam"] and result["categories"]["illicit"]
    assert result["category_scores"]["spam"] == 1.0 == result["category_scores"]["illicit"]


def test_a_safe_verdict_flags_nothing() -> None:
    result = openai_result(verdict([], {c: 0.01 for c in CATEGORY_CODES}, flagged=False), ["text"])
    assert result["flagged"] is False and not any(result["categories"].values())


def test_event_lag_is_measured_from_created_at() -> None:
    from worker.contracts.verdicts import event_lag_seconds

    assert event_lag_seconds("2026-11-23T12:00:00Z", 1_795_435_205.5) == pytest.approx(5.5)
    assert (
        event_lag_seconds("2026-11-23T12:00:00.5+01:00", 1_795_431_600.0) == 0.0
    )  # clock skew: never negative
    assert event_lag_seconds(None, 0.0) is None and event_lag_seconds("not a time", 0.0) is None
