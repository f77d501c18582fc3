"""Per-category scores: read from the scoring pass's distribution after ``unsafe\\nS`` (no extra pass)."""

from __future__ import annotations

import pytest

from worker.config import CATEGORY_CODES
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.engine.category_scores import category_scores
from worker.engine.engine import GuardEngine
from worker.engine.policy import Policy
from worker.engine.types import GuardResult

from .test_engine import requests_from_examples


def test_every_code_has_its_own_first_token_on_the_tiny_tokenizer(trained_engine: GuardEngine) -> None:
    assert list(trained_engine.code_tokens) == list(CATEGORY_CODES)
    assert len(set(trained_engine.code_tokens.values())) == len(CATEGORY_CODES)


def test_scores_are_p_unsafe_split_over_the_enabled_codes() -> None:
    scores = category_scores(0.8, [0.5, 0.3, 0.2], ["S1", "S2", "S3"], ["S1", "S3"])
    assert scores == pytest.approx({"S1": 0.8 * 0.5 / 0.7, "S3": 0.8 * 0.2 / 0.7}, abs=1e-6)
    assert sum(scores.values()) == pytest.approx(0.8)


def test_top_scored_category_is_the_first_code_the_model_decodes(trained_engine: GuardEngine) -> None:
    policy = trained_engine.policy_for(None)
    examples = synthetic_examples(80, seed=11, split="heldout")
    results = trained_engine.classify(requests_from_examples(examples, policy))
    unsafe = [r for r in results if isinstance(r, GuardResult) and r.unsafe and r.codes]
    assert len(unsafe) >= 5, "the held-out sample must hold unsafe examples"
    for result in unsafe:
        assert result.category_scores is not None
        first_written = result.raw_output.split("\n")[1].split(",")[0].strip()
        top = max(result.category_scores, key=result.category_scores.get)
        assert top == first_written
        assert sum(result.category_scores.values()) == pytest.approx(result.score, abs=1e-4)


def test_safe_verdicts_carry_category_scores_too(trained_engine: GuardEngine) -> None:
    policy = trained_engine.policy_for(None)
    results = trained_engine.classify(
        requests_from_examples(synthetic_examples(20, seed=5, split="heldout"), policy)
    )
    safe = [r for r in results if isinstance(r, GuardResult) and not r.unsafe]
    assert safe and all(r.category_scores is not None for r in safe)
    for r in safe:
        assert set(r.category_scores) == set(policy.codes)
        assert max(r.category_scores.values()) <= r.score + 1e-6


def test_scores_cover_only_the_policy_s_enabled_codes(trained_engine: GuardEngine) -> None:
    narrow = Policy(
        "narrow", tuple(c for c in trained_engine.policy_for(None).categories if c.code in ("S1", "S13"))
    )
    results = trained_engine.classify(
        requests_from_examples(synthetic_examples(8, seed=2, split="heldout"), narrow)
    )
    for r in results:
        assert isinstance(r, GuardResult) and set(r.category_scores) == {"S1", "S13"}


def test_generate_mode_has_no_category_scores(trained_engine: GuardEngine) -> None:
    policy = trained_engine.policy_for(None)
    reference = trained_engine.with_mode("generate")
    result = reference.classify(
        requests_from_examples(synthetic_examples(2, seed=1, split="heldout"), policy)
    )[0]
    assert isinstance(result, GuardResult) and result.category_scores is None
