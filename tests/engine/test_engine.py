"""GuardEngine end to end on the tiny checkpoints: loading, answer position, batching, modes, failures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.contracts.events import Turn
from worker.contracts.rejections import Reason, RejectedError
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_image, example_turns
from worker.engine import scoring
from worker.engine.engine import GuardEngine
from worker.engine.loading import ModelLoadError, load_model
from worker.engine.policy import Policy
from worker.engine.prompt import render_segments
from worker.engine.types import EngineError, GuardRequest, GuardResult

from .conftest import engine_settings


def requests_from_examples(examples, policy: Policy) -> list[GuardRequest]:
    return [GuardRequest(example_turns(e.event), policy, example_image(e.event)) for e in examples]


def text_request(policy: Policy, *texts: str) -> GuardRequest:
    roles = ("user", "assistant")
    return GuardRequest(tuple(Turn(roles[i % 2], (t,)) for i, t in enumerate(texts)), policy)


# -- loading ------------------------------------------------------------------------------------------------


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=r"model\.path .*no-such-model.*no such directory"):
        load_model(engine_settings(missing).model)


def test_directory_without_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.path .* no loadable model config"):
        load_model(engine_settings(tmp_path).model)


def test_non_mllama_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelLoadError, match=r"'gpt2' checkpoint, not a 'mllama' one"):
        load_model(engine_settings(tmp_path).model)


def test_uncached_hub_id_with_local_files_only_is_a_clear_error() -> None:
    with pytest.raises(
        ModelLoadError, match=r"model\.path .example-org/not-downloaded-guard.: not a local directory"
    ):
        load_model(engine_settings(Path("example-org/not-downloaded-guard")).model)


def test_loaded_engine_reports_its_facts(untrained_engine: GuardEngine, untrained_model_dir: Path) -> None:
    assert untrained_engine.device == "cpu"
    assert untrained_engine.load_seconds > 0
    assert untrained_engine.model_info.id == untrained_model_dir.name
    assert untrained_engine.model_info.revision and untrained_engine.model_info.revision.startswith("local-")
    assert untrained_engine.model.dtype == torch.float32
    assert not untrained_engine.model.training


def test_unknown_policy_id_is_rejected(untrained_engine: GuardEngine) -> None:
    assert untrained_engine.policy_for(None).id == "default"
    with pytest.raises(RejectedError) as info:
        untrained_engine.policy_for("nope")
    assert info.value.rejection.reason is Reason.UNKNOWN_POLICY


# -- answer position ---------------------------------------------------------------------------------------


def test_answer_prefix_is_the_whitespace_the_trained_model_emits(trained_engine: GuardEngine) -> None:
    assert trained_engine.tokenizer.decode(trained_engine.answer_prefix_ids) == "\n\n"


def test_scoring_position_is_where_generate_emits_safe_or_unsafe(trained_engine: GuardEngine) -> None:
    engine = trained_engine
    policy = engine.policy_for(None)
    prefix, tail = engine.answer_prefix_ids, engine.answer_tail
    assert engine.tokenizer.decode(tail) == "unsafe\nS"
    examples = synthetic_examples(24, seed=7, split="heldout")
    for has_image in (False, True):
        group = [r for r in requests_from_examples(examples, policy) if r.has_image == has_image][:6]
        assert group, "the synthetic set has both modalities"
        scored = engine.with_mode("single_pass", share_prefix=False).prepare(group)  # prompt + prefix + tail
        reference = engine.with_mode("generate").prepare(group)  # the bare prompt
        with torch.inference_mode():
            out = engine.model(**scoring.model_kwargs(scored.inputs), logits_to_keep=len(tail) + 1)
            ours = scoring.score(engine.model, scored.inputs, engine.answer, tail, keep_cache=False)
            gen = scoring.generate(engine.model, reference.inputs, engine.answer, engine.tokens.pad_id, 8)
        word_ids = {engine.answer.safe_id, engine.answer.unsafe_id}
        for row in range(len(group)):
            emitted = gen.tokens[row]
            assert emitted[: len(prefix)] == prefix
            assert emitted[len(prefix)] in word_ids
            # Our answer position (just before the tail) has generate's logits at the step it writes the word.
            at_answer = out.logits[row, 0, [engine.answer.safe_id, engine.answer.unsafe_id]].float()
            assert torch.allclose(at_answer, gen.step_logits[len(prefix), row], atol=1e-4)
            assert int(out.logits[row, 0].argmax()) == emitted[len(prefix)]
            if emitted[len(prefix)] == engine.answer.unsafe_id:
                # Unsafe answers continue with the tail, and the pass already knows the token after it.
                after_word = emitted[len(prefix) : len(prefix) + len(tail) + 1]
                assert after_word[: len(tail)] == tail
                assert bool(ours.tail_ok[row]) and int(ours.next_ids[row]) == after_word[len(tail)]


def test_rows_that_do_not_write_the_tail_are_decoded_exactly(untrained_engine: GuardEngine) -> None:
    engine = untrained_engine
    everything = Policy("all", engine.policy_for(None).categories, 0.0)  # every row is decoded
    requests = [text_request(everything, "hello"), text_request(everything, "a", "longer reply here")]
    whole = engine.with_mode("single_pass", share_prefix=False).prepare(requests)
    with torch.inference_mode():
        ours = scoring.score(engine.model, whole.inputs, engine.answer, engine.answer_tail, keep_cache=False)
    assert not bool(ours.tail_ok.any()), "an untrained model does not write the answer format"
    results = engine.run(engine.prepare(requests))  # with the shared prompt start
    assert [r.raw_output for r in engine.run(whole)] == [r.raw_output for r in results]
    # Reference: plain greedy generation after prompt + prefix + "unsafe".
    segments = [render_segments(r.turns, r.policy, has_image=False) for r in requests]
    forced = engine._tensors(segments, prefix=engine.answer_prefix_ids + list(engine.answer.unsafe_ids))
    forced.pop("position_ids")
    with torch.inference_mode():
        gen = scoring.generate(
            engine.model, forced, engine.answer, engine.tokens.pad_id, engine.max_new_tokens
        )
    for result, ids in zip(results, gen.tokens):
        assert isinstance(result, EngineError)  # random text is never a well-formed answer
        assert result.raw_output == "unsafe" + engine.tokenizer.decode(ids, skip_special_tokens=False)


# -- batching ----------------------------------------------------------------------------------------------


def test_mixed_image_and_text_list_scores_like_each_item_alone(trained_engine: GuardEngine) -> None:
    policy = trained_engine.policy_for(None)
    examples = synthetic_examples(40, seed=3, split="heldout")
    requests = requests_from_examples(examples, policy)[:16]
    assert any(r.has_image for r in requests) and not all(r.has_image for r in requests)
    together = trained_engine.classify(requests)
    alone = [trained_engine.classify([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert isinstance(a, GuardResult) and isinstance(b, GuardResult)
        assert abs(a.score - b.score) <= 1e-5
        assert (a.unsafe, a.codes) == (b.unsafe, b.codes)


def test_prepare_in_worker_threads_while_run_goes_on_gives_the_same_results(
    trained_engine: GuardEngine,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    policy = trained_engine.policy_for(None)
    requests = requests_from_examples(synthetic_examples(48, seed=21, split="heldout"), policy)
    chunks = [c for c in ([r for r in requests if r.has_image == m] for m in (False, True)) if c]
    chunks = [c[i : i + 8] for c in chunks for i in range(0, len(c), 8)]
    sequential = [trained_engine.run(trained_engine.prepare(c)) for c in chunks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(trained_engine.prepare, c) for c in chunks]
        overlapped = [trained_engine.run(f.result(timeout=120)) for f in futures]
    for seq, ovl in zip(sequential, overlapped):
        assert [(r.score, r.unsafe, r.codes) for r in seq] == [(r.score, r.unsafe, r.codes) for r in ovl]


def test_shared_prompt_start_gives_the_same_results_as_whole_prompts(trained_engine: GuardEngine) -> None:
    default = trained_engine.policy_for(None)
    strict = Policy("strict", default.categories[:9], 0.3)  # another prompt start in the same batch
    examples = [e for e in synthetic_examples(60, seed=13, split="heldout") if not e.has_image][:24]
    requests = [
        dataclasses.replace(r, policy=strict if i % 3 == 0 else default)
        for i, r in enumerate(requests_from_examples(examples, default))
    ]
    assert {r.turns and len(r.turns) % 2 for r in requests} == {0, 1}, "both tasks (User and Agent prompts)"
    shared_batch = trained_engine.prepare(requests)
    assert shared_batch.prefix_keys and len(set(shared_batch.prefix_keys)) >= 3
    shared = trained_engine.run(shared_batch)
    assert trained_engine.score_only(shared_batch) == pytest.approx([r.score for r in shared], abs=1e-6)
    whole = trained_engine.with_mode("single_pass", share_prefix=False).classify(requests)
    for a, b in zip(shared, whole):
        assert isinstance(a, GuardResult) and isinstance(b, GuardResult)
        assert abs(a.score - b.score) <= 1e-5
        assert (a.unsafe, a.codes, a.dropped_codes) == (b.unsafe, b.codes, b.dropped_codes)


def test_prepare_refuses_mixed_modalities_where_they_are_not_exact(untrained_engine: GuardEngine) -> None:
    # The generate reference mode never mixes (no reference masking: see test_cross_attention.py).
    policy = untrained_engine.policy_for(None)
    with pytest.raises(ValueError, match="mix"):
        untrained_engine.with_mode("generate").prepare(
            [
                text_request(policy, "hi"),
                GuardRequest((Turn("user", ("look",)),), policy, Image.new("RGB", (40, 30))),
            ]
        )


def test_text_only_batches_carry_no_pixel_values(untrained_engine: GuardEngine) -> None:
    policy = untrained_engine.policy_for(None)
    batch = untrained_engine.prepare([text_request(policy, "hi"), text_request(policy, "a", "b")])
    assert set(batch.inputs) == {"input_ids", "attention_mask", "position_ids"}
    image_batch = untrained_engine.prepare(
        [GuardRequest((Turn("user", ("look",)),), policy, Image.new("RGB", (40, 30)))]
    )
    assert {"pixel_values", "cross_attention_mask", "aspect_ratio_ids"} <= set(image_batch.inputs)


# -- modes -------------------------------------------------------------------------------------------------


def test_single_pass_and_generate_agree_and_follow_the_toy_policy(trained_engine: GuardEngine) -> None:
    generate_engine = trained_engine.with_mode("generate")
    policy = trained_engine.policy_for(None)
    examples = synthetic_examples(240, seed=11, split="heldout")
    requests = requests_from_examples(examples, policy)
    single = trained_engine.classify(requests)
    reference = generate_engine.classify(requests)
    correct = 0
    for example, s, g in zip(examples, single, reference):
        assert isinstance(s, GuardResult), getattr(s, "raw_output", s)
        assert isinstance(g, GuardResult), getattr(g, "raw_output", g)
        assert (s.unsafe, s.codes) == (g.unsafe, g.codes), (example.event, s, g)
        assert abs(s.score - g.score) < 1e-4
        correct += (("unsafe" if s.unsafe else "safe"), s.codes) == (example.decision, example.codes)
    accuracy = correct / len(examples)
    print(f"tiny model held-out accuracy (decision+codes): {accuracy:.3f} on {len(examples)} items")
    assert accuracy >= 0.95


def test_codes_outside_the_policy_are_dropped_and_reported(trained_engine: GuardEngine) -> None:
    no_weapons = Policy(
        "no-s9", tuple(c for c in trained_engine.policy_for(None).categories if c.code != "S9")
    )
    examples = [e for e in synthetic_examples(80, seed=5, split="heldout") if e.codes == ("S9",)][:4]
    assert examples
    # The tiny model learnt S9 under the full policy and still names it when the prompt lacks S9: the engine
    # must not pass it on as a category of this policy, and must say that it dropped it.
    results = trained_engine.classify(requests_from_examples(examples, no_weapons))
    assert all(isinstance(r, GuardResult) for r in results)
    assert all(set(r.codes) <= set(no_weapons.codes) for r in results)
    assert any(r.unsafe and r.dropped_codes == ("S9",) for r in results)


# -- failures stay per item --------------------------------------------------------------------------------


def test_a_failing_batch_becomes_engine_errors_and_the_engine_keeps_working(
    untrained_engine: GuardEngine,
) -> None:
    policy = Policy("never", untrained_engine.policy_for(None).categories, 1.0)
    batch = untrained_engine.prepare([text_request(policy, "hi"), text_request(policy, "there")])
    broken = dataclasses.replace(batch, inputs=dict(batch.inputs))
    broken.inputs["input_ids"] = broken.inputs["input_ids"].clone()
    broken.inputs["input_ids"][0, -1] = 10**7  # out of the vocabulary: the embedding lookup fails
    results = untrained_engine.run(broken)
    assert all(isinstance(r, EngineError) for r in results) and len(results) == 2
    assert all(isinstance(r, GuardResult) for r in untrained_engine.run(batch))


def test_an_unprocessable_image_fails_only_its_item(untrained_engine: GuardEngine) -> None:
    policy = Policy("never", untrained_engine.policy_for(None).categories, 1.0)
    good = GuardRequest((Turn("user", ("look",)),), policy, Image.new("RGB", (40, 30), (10, 200, 10)))
    bad = GuardRequest((Turn("user", ("look",)),), policy, Image.new("RGB", (0, 0)))
    results = untrained_engine.classify([good, bad])
    assert isinstance(results[0], GuardResult)
    assert isinstance(results[1], EngineError) and "image" in str(results[1])
