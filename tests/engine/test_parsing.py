"""Strict answer parsing: exact formats accepted, everything else an EngineError carrying the raw text."""

from __future__ import annotations

import pytest

from worker.engine.parsing import ParsedAnswer, parse_answer, parse_codes_continuation
from worker.engine.types import EngineError

ALL = {f"S{i}" for i in range(1, 14)}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("safe", ParsedAnswer(False)),
        ("\n\nsafe", ParsedAnswer(False)),
        ("\n\nsafe\n", ParsedAnswer(False)),
        ("unsafe\nS1", ParsedAnswer(True, ("S1",))),
        ("\n\nunsafe\nS9", ParsedAnswer(True, ("S9",))),
        ("unsafe\nS13,S1,S3", ParsedAnswer(True, ("S1", "S3", "S13"))),
        ("unsafe\nS1, S3", ParsedAnswer(True, ("S1", "S3"))),
        ("unsafe\nS2,S2", ParsedAnswer(True, ("S2",))),
        ("unsafe\nS10\n", ParsedAnswer(True, ("S10",))),
    ],
)
def test_well_formed_answers(raw: str, expected: ParsedAnswer) -> None:
    assert parse_answer(raw, ALL) == expected


def test_codes_outside_the_policy_are_dropped_and_reported() -> None:
    assert parse_answer("unsafe\nS1,S9,S14", {"S1", "S2"}) == ParsedAnswer(True, ("S1",), ("S9", "S14"))


def test_all_codes_dropped_stays_unsafe_with_empty_codes() -> None:
    assert parse_answer("unsafe\nS9", {"S1"}) == ParsedAnswer(True, (), ("S9",))


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "Safe",
        "SAFE",
        "unsafe",  # no category line
        "\n\nunsafe\n",
        "safe\nS1",
        "safety",
        "unsafe S1",
        "unsafe\nS1\nS2",
        "unsafe\nS1;S2",
        "unsafe\nS1,",
        "unsafe\n,S1",
        "unsafe\nS1,,S2",
        "unsafe\ns1",
        "unsafe\nS",
        "unsafe\nViolent Crimes",
        "unsafe\nS1 S2",
        "unsafe\nS1, S",  # truncated mid-code
        "I think this is safe",
        "<|eot_id|>",
        "unsafe\n\nS1",
        "unsafe\nS1.",
        "unsafe\nS1,S2 and more",
        "unsafe\u00a0\nS1x",
    ],
)
def test_malformed_answers_raise_with_the_raw_text(raw: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_answer(raw, ALL)
    assert info.value.raw_output == raw


def test_continuation_after_forced_unsafe() -> None:
    assert parse_codes_continuation("\nS9", ALL) == ParsedAnswer(True, ("S9",))
    with pytest.raises(EngineError):
        parse_codes_continuation("", ALL)
