"""One engine contract for every family: the tiny text guard (``LlamaForCausalLM``) judged as Llama Guard 3 1B
and as Llama Guard 3 8B, through the same ``from_pretrained`` loading as real weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from worker.config import PolicySettings, load_settings
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_turns
from worker.engine.engine import GuardEngine
from worker.engine.loading import ModelLoadError, load_model
from worker.engine.policy import policy_from_settings
from worker.engine.types import EngineError, GuardRequest, GuardResult


def text_examples(n: int, seed: int):
    return [e for e in synthetic_examples(n, seed=seed, split="heldout") if not e.has_image]


@pytest.fixture(scope="module")
def engine_8b(tiny_text_guard_dir: Path) -> GuardEngine:
    return GuardEngine.from_settings(
        load_settings(
            model__path=str(tiny_text_guard_dir), model__family="llama-guard-3-8b", model__device="cpu"
        )
    )


def test_text_guard_properties(text_guard_engine: GuardEngine, engine_8b: GuardEngine) -> None:
    assert text_guard_engine.family == "llama-guard-3-1b" and engine_8b.family == "llama-guard-3-8b"
    assert not text_guard_engine.supports_images and text_guard_engine.max_images == 0
    assert type(text_guard_engine.model).__name__ == "LlamaForCausalLM"
    assert text_guard_engine.policy_for(None).codes[-1] == "S13"
    assert engine_8b.policy_for(None).codes[-1] == "S14"  # the 8B model's built-ins include S14
    assert text_guard_engine.tokenizer.decode(text_guard_engine.answer_prefix_ids) == "\n\n"


@pytest.mark.parametrize("which", ["1b", "8b"])
def test_text_guard_follows_the_toy_policy_in_both_modes(
    which: str, text_guard_engine: GuardEngine, engine_8b: GuardEngine
) -> None:
    engine = text_guard_engine if which == "1b" else engine_8b
    policy = engine.policy_for(None)
    examples = text_examples(160, seed=31)
    requests = [GuardRequest(example_turns(e.event), policy) for e in examples]
    single = engine.classify(requests)
    generated = engine.with_mode("generate").classify(requests)
    correct = decided = 0
    for example, a, b in zip(examples, single, generated):
        assert isinstance(a, GuardResult) and isinstance(b, GuardResult), (a, b)
        # The two modes agree: same decision and codes, P(unsafe) from the same logits.
        assert (a.unsafe, a.codes) == (b.unsafe, b.codes)
        assert abs(a.score - b.score) <= 1e-4
        decided += ("unsafe" if a.unsafe else "safe") == example.decision
        correct += (("unsafe" if a.unsafe else "safe"), a.codes) == (example.decision, example.codes)
    print(
        f"{which}: toy-policy decisions {decided}/{len(examples)}, decisions+codes {correct}/{len(examples)}"
    )
    # The text guard's recipe (see worker.dev.tiny_model.build) reaches 1.0 on held-out samples; room for noise.
    assert len(examples) >= 80 and decided / len(examples) >= 0.95 and correct / len(examples) >= 0.9


def test_shared_prompt_start_is_exact_for_the_text_guard(text_guard_engine: GuardEngine) -> None:
    default = text_guard_engine.policy_for(None)
    strict = dataclasses.replace(default, categories=default.categories[:9], threshold=0.3)
    examples = text_examples(60, seed=13)[:16]
    requests = [
        GuardRequest(example_turns(e.event), strict if i % 3 == 0 else default)
        for i, e in enumerate(examples)
    ]
    shared_batch = text_guard_engine.prepare(requests)
    assert shared_batch.prefix_keys, "text rows share their prompt start"
    shared = text_guard_engine.run(shared_batch)
    whole = text_guard_engine.with_mode("single_pass", share_prefix=False).classify(requests)
    for a, b in zip(shared, whole):
        assert isinstance(a, GuardResult) and isinstance(b, GuardResult)
        assert abs(a.score - b.score) <= 1e-5 and (a.unsafe, a.codes) == (b.unsafe, b.codes)


def test_text_guard_refuses_images_per_item(text_guard_engine: GuardEngine) -> None:
    policy = text_guard_engine.policy_for(None)
    turns = example_turns(text_examples(10, seed=2)[0].event)
    image = Image.new("RGB", (8, 8), "red")
    results = text_guard_engine.classify([GuardRequest(turns, policy, image), GuardRequest(turns, policy)])
    assert isinstance(results[0], EngineError) and "reads no images" in str(results[0])
    assert isinstance(results[1], GuardResult)


def test_custom_category_reaches_prompt_and_verdict(text_guard_engine: GuardEngine) -> None:
    custom = policy_from_settings(
        "custom", PolicySettings(custom_categories={"S14": "Spam"}, threshold=0.0), "llama-guard-3-1b"
    )
    turns = example_turns(text_examples(10, seed=4)[0].event)
    prompt = "".join(s.text for s in text_guard_engine._render(turns, custom))
    assert "S13: Elections.\nS14: Spam.\n<END UNSAFE CONTENT CATEGORIES>" in prompt
    assert custom.codes[-1] == "S14"
    assert custom.verdict_categories(["S14"]) == [{"code": "S14", "name": "Spam", "custom": True}]
    assert custom.hash != text_guard_engine.policy_for(None).hash


def test_family_must_match_the_checkpoint(tiny_text_guard_dir: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a 'mllama' one"):
        load_model(load_settings(model__path=str(tiny_text_guard_dir)).model)
    with pytest.raises(ModelLoadError, match="not a 'llama' one"):
        load_model(load_settings(model__path=str(tiny_model_dir), model__family="llama-guard-3-1b").model)
