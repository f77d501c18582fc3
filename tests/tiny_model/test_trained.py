"""The trained tiny checkpoint follows the toy policy on held-out data, through real greedy ``generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor, MllamaForConditionalGeneration

from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import generate_answers, parse_answer, policy_accuracy
from worker.engine.families.mllama_cross_attention import apply_reference_cross_attention


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    model = MllamaForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    # Trained under the reference cross-attention masking, and served with it: evaluated with it too.
    assert apply_reference_cross_attention(model) >= 1
    return model, processor


def test_follows_the_toy_policy_on_heldout_conversations(trained) -> None:
    model, processor = trained
    # A different held-out seed than the one the build reports, so this is an independent sample.
    examples = synthetic_examples(200, seed=7, split="heldout")
    answers = generate_answers(model, processor, examples)
    metrics = policy_accuracy(examples, answers)
    print("held-out toy-policy accuracy:", {k: round(v, 4) for k, v in sorted(metrics.items())})
    assert metrics["image_count"] >= 20 and metrics["text_count"] >= 100
    assert metrics["all_decision_accuracy"] >= 0.95
    assert metrics["all_exact_accuracy"] >= 0.95
    assert metrics["text_decision_accuracy"] >= 0.95
    assert metrics["image_decision_accuracy"] >= 0.9


def test_answers_in_the_llama_guard_format(trained) -> None:
    model, processor = trained
    examples = synthetic_examples(40, seed=8, split="heldout")
    answers = generate_answers(model, processor, examples)
    for answer in answers:
        assert answer.startswith("\n\n"), repr(answer)  # whitespace first, like Llama Guard 3
        assert parse_answer(answer) is not None, repr(answer)
    by_kind = {e.kind: parse_answer(a) for e, a in zip(examples, answers)}
    assert by_kind.get("weapon_request", ("unsafe", ("S9",))) == ("unsafe", ("S9",))
    assert by_kind.get("election_misinfo", ("unsafe", ("S13",))) == ("unsafe", ("S13",))


def test_parse_answer_is_strict() -> None:
    assert parse_answer("\n\nsafe") == ("safe", ())
    assert parse_answer("\n\nunsafe\nS9") == ("unsafe", ("S9",))
    assert parse_answer("\n\nunsafe\nS1,S13") == ("unsafe", ("S1", "S13"))
    assert parse_answer("\n\nunsafe") is None
    assert parse_answer("\n\nsafe\nS1") is None
    assert parse_answer("maybe") is None


@pytest.mark.parametrize("family", ["llama-guard-3-1b", "llama-guard-3-8b"])
def test_text_guard_follows_the_toy_policy_with_either_prompt(tiny_text_guard_dir: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_guard_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_guard_dir, local_files_only=True).eval()
    examples = [e for e in synthetic_examples(200, seed=7, split="heldout") if not e.has_image]
    answers = generate_answers(model, tokenizer, examples, family=family)
    metrics = policy_accuracy(examples, answers)
    print(f"{family} held-out toy-policy accuracy:", {k: round(v, 4) for k, v in sorted(metrics.items())})
    assert metrics["text_count"] >= 100
    # Its recipe reaches 1.0 on held-out samples; the bars leave room for library/seed noise.
    assert metrics["text_decision_accuracy"] >= 0.95 and metrics["text_exact_accuracy"] >= 0.9
