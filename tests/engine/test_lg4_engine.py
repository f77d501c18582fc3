"""The engine judges Llama Guard 4 requests (text, one image, several images) with the trained tiny Llama 4 guard,
loaded through the same ``from_pretrained`` code as real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from worker.config import load_settings
from worker.contracts.events import Turn
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_image, example_turns
from worker.engine.engine import GuardEngine
from worker.engine.types import GuardRequest, GuardResult

# What the briefly CPU-trained tiny guard reaches on held-out items (see worker.dev.tiny_model.build).
MIN_DECISION_ACCURACY = 0.95


@pytest.fixture(scope="module")
def lg4_engine(tiny_lg4_dir: Path) -> GuardEngine:
    return GuardEngine.from_settings(
        load_settings(model__path=str(tiny_lg4_dir), model__device="cpu", model__family="llama-guard-4")
    )


def test_lg4_engine_properties(lg4_engine: GuardEngine) -> None:
    assert lg4_engine.family == "llama-guard-4" and lg4_engine.supports_images
    assert lg4_engine.max_images == 5  # limits.max_images_llama_guard_4's default
    assert isinstance(lg4_engine.model, __import__("transformers").Llama4ForConditionalGeneration)
    assert lg4_engine.policy_for(None).codes[-1] == "S14"


def test_lg4_follows_the_toy_policy_in_both_modes(lg4_engine: GuardEngine) -> None:
    policy = lg4_engine.policy_for(None)
    examples = synthetic_examples(200, seed=57, split="heldout")
    requests = [
        GuardRequest(example_turns(e.event), policy, images=(example_image(e.event),) if e.has_image else ())
        for e in examples
    ]
    single = lg4_engine.classify(requests)
    generated = lg4_engine.with_mode("generate").classify(requests)
    tally = {False: [0, 0, 0], True: [0, 0, 0]}  # per modality: items, decisions right, decisions+codes right
    for example, a, b in zip(examples, single, generated):
        assert isinstance(a, GuardResult) and isinstance(b, GuardResult), (a, b)
        # Single-pass and generate agree: same decision and codes, P(unsafe) from the same logits.
        assert (a.unsafe, a.codes) == (b.unsafe, b.codes)
        assert abs(a.score - b.score) <= 1e-4
        row = tally[example.has_image]
        row[0] += 1
        row[1] += ("unsafe" if a.unsafe else "safe") == example.decision
        row[2] += (("unsafe" if a.unsafe else "safe"), a.codes) == (example.decision, example.codes)
    for has_image, (n, decided, exact) in tally.items():
        print(f"LG4 {'image' if has_image else 'text'}: decisions {decided}/{n}, decisions+codes {exact}/{n}")
        assert n >= 10
        assert decided / n >= MIN_DECISION_ACCURACY


def test_an_event_with_several_images(lg4_engine: GuardEngine) -> None:
    policy = lg4_engine.policy_for(None)
    marker = [e for e in synthetic_examples(400, seed=58, split="heldout") if e.kind == "image_marker"]
    plain = [e for e in synthetic_examples(400, seed=58, split="heldout") if e.kind == "image_plain"]
    red_x, calm, calm2 = (
        example_image(marker[0].event),
        example_image(plain[0].event),
        example_image(plain[1].event),
    )
    turns = (Turn(role="user", texts=("What do you see in these pictures?",)),)
    requests = [
        GuardRequest(turns, policy, images=(calm, calm2)),
        GuardRequest(turns, policy, images=(calm, red_x, calm2)),
        GuardRequest(turns, policy, images=(Image.new("RGB", (300, 40), (30, 90, 200)), calm, calm2, calm)),
    ]
    for mode in ("single_pass", "generate"):
        results = lg4_engine.with_mode(mode).classify(requests)
        assert all(isinstance(r, GuardResult) for r in results), results
        print(mode, [(r.unsafe, r.codes, round(r.score, 3)) for r in results])
        assert results[1].score > results[0].score  # the red-X marker among calm images raises P(unsafe)
    too_many = GuardRequest(turns, policy, images=(calm,) * 6)
    [refused] = lg4_engine.classify([too_many])
    assert not isinstance(refused, GuardResult) and "at most 5 image(s)" in str(refused)
