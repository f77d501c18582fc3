"""Training text rows with their shared prompt start computed once is exact: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from worker.dev.tiny_model import build
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import (
    _answer_loss,
    _encode_batch,
    _encode_prefix_batch,
    _prefix_answer_loss,
    _PrefixBatch,
    _training_batches,
    example_turns,
)
from worker.engine.families.common import judged_role


def _model_and_processor(family: str):
    recipe = build.default_recipe(train=False, family=family)
    tokenizer = build.build_tokenizer(recipe)
    if family == "llama-guard-4":
        processor = build.build_lg4_processor(recipe, tokenizer)
        model = build.build_lg4_model(recipe, build.build_lg4_config(recipe, tokenizer))
    else:
        processor = tokenizer
        model = build.build_text_model(recipe, build.build_text_config(recipe, tokenizer))
    return model.train(), processor, tokenizer


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("checkpoint", "family"),
    [
        ("llama-guard-3-1b", "llama-guard-3-1b"),
        ("llama-guard-3-1b", "llama-guard-3-8b"),
        ("llama-guard-4", "llama-guard-4"),
    ],
)
@pytest.mark.parametrize("role", ["User", "Agent"])
def test_shared_prefix_loss_and_gradients_equal_the_plain_batch(
    checkpoint: str, family: str, role: str
) -> None:
    model, processor, tokenizer = _model_and_processor(checkpoint)
    examples = [
        e
        for e in synthetic_examples(120, seed=3, split="train")
        if not e.has_image and judged_role(example_turns(e.event)) == role
    ][:5]
    shared = _assert_same_training_signal(model, processor, tokenizer, examples, (family,))
    assert shared.prefix["input_ids"].shape[0] == 1  # one family, one role: one start


def test_mixed_batch_of_both_prompts_and_both_roles_is_exact_too() -> None:
    """The text guard's real batches: rows alternate the 1B and 8B prompts and mix prompt/response tasks."""
    model, processor, tokenizer = _model_and_processor("llama-guard-3-1b")
    examples = [e for e in synthetic_examples(60, seed=5, split="train") if not e.has_image][:8]
    assert len({judged_role(example_turns(e.event)) for e in examples}) == 2
    families = ("llama-guard-3-1b", "llama-guard-3-8b")
    shared = _assert_same_training_signal(model, processor, tokenizer, examples, families)
    assert shared.prefix["input_ids"].shape[0] == 4  # (1B, 8B) x (User, Agent): each start computed once


def _assert_same_training_signal(model, processor, tokenizer, examples, families) -> _PrefixBatch:
    shared = _encode_prefix_batch(tokenizer, examples, families)
    assert shared is not None
    plain = _encode_batch(processor, examples, with_targets=True, families=families)
    # The shared start is the policy part: a large share of every row is computed once.
    assert int(shared.prefix["attention_mask"].sum(dim=1).min()) > 80
    assert shared.inputs["input_ids"].shape[1] < plain.inputs["input_ids"].shape[1]

    model.zero_grad()
    plain_loss = _answer_loss(model, plain)
    plain_loss.backward()
    plain_grads = _grads(model)
    model.zero_grad()
    shared_loss = _prefix_answer_loss(model, shared)
    shared_loss.backward()
    shared_grads = _grads(model)

    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert set(shared_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return shared


def test_text_guard_batches_share_starts_and_cover_every_text_example() -> None:
    _, processor, tokenizer = _model_and_processor("llama-guard-3-1b")
    examples = synthetic_examples(150, seed=4, split="train")
    text = [e for e in examples if not e.has_image]
    batches = _training_batches(processor, text, 8, ("llama-guard-3-1b", "llama-guard-3-8b"))
    assert all(isinstance(b, _PrefixBatch) for b in batches)
    assert sum(b.inputs["input_ids"].shape[0] for b in batches) == len(text)
    # Both prompts are trained in every batch (rows alternate them).
    assert all(b.prefix["input_ids"].shape[0] >= 2 for b in batches)
