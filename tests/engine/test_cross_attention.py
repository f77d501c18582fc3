"""Reference cross-attention masking on the tiny Llama Guard 3 Vision (real transformers Mllama classes).

With the patch, tokens that see no image are exactly independent of any image: the header before
``<|image|>`` and every token of a text-only row. Each property is also checked *without* the patch, where it
must fail, so the tests can tell the two forwards apart. Then the engine-level consequences: image rows share
their prompt start exactly, and mixed-modality batches give the results of split ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from worker.contracts.events import Turn
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_image, example_turns
from worker.engine.engine import GuardEngine
from worker.engine.families import mllama_cross_attention as xattn
from worker.engine.loading import ModelLoadError, load_model
from worker.engine.policy import Policy
from worker.engine.types import GuardRequest, GuardResult

from .conftest import engine_settings


def _images() -> list[Image.Image]:
    red_x = Image.new("RGB", (64, 48), (240, 240, 240))
    for k in range(48):
        red_x.putpixel((k, k), (220, 0, 0))
        red_x.putpixel((47 - k, k), (220, 0, 0))
    gradient = Image.linear_gradient("L").convert("RGB").resize((120, 40))
    return [red_x, gradient, Image.new("RGB", (30, 90), (10, 120, 200))]


@pytest.fixture(scope="module")
def private_engine(untrained_model_dir: Path) -> GuardEngine:
    """An engine on its own copy of the untrained model: these tests switch the patch off and on."""
    return GuardEngine.from_settings(engine_settings(untrained_model_dir, model__share_prompt_prefix=False))


@pytest.fixture()
def unpatched(private_engine: GuardEngine):
    """The private model with transformers' own cross-attention forward for the duration of a test."""
    assert xattn.remove_reference_cross_attention(private_engine.model) >= 1
    try:
        yield private_engine.model
    finally:
        xattn.apply_reference_cross_attention(private_engine.model)


def _logits(engine: GuardEngine, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(**inputs, logits_to_keep=0).logits.float()


def _image_prompt(engine: GuardEngine, image: Image.Image) -> dict[str, torch.Tensor]:
    request = GuardRequest((Turn("user", ("what is in this picture?",)),), engine.policy_for(None), image)
    return engine.prepare([request]).inputs


def _before_image(engine: GuardEngine, inputs: dict[str, torch.Tensor]) -> int:
    return inputs["input_ids"][0].tolist().index(engine.tokens.image_id)


def test_the_patch_is_on_by_default_for_mllama(private_engine: GuardEngine) -> None:
    assert private_engine.loaded.reference_cross_attention
    assert xattn.uses_reference_cross_attention(private_engine.model)
    assert private_engine.mixes_modalities and private_engine.shares_image_prefix


def test_tokens_before_the_image_do_not_depend_on_it(private_engine: GuardEngine) -> None:
    first, second, third = (_image_prompt(private_engine, im) for im in _images())
    start = _before_image(private_engine, first)
    assert start >= 3  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>...
    a, b, c = (_logits(private_engine, x)[0, :start] for x in (first, second, third))
    assert torch.equal(a, b) and torch.equal(a, c)
    # ... and equal what the header gives with no image at all (the text-only path skips cross-attention).
    header = first["input_ids"][:, :start]
    with torch.inference_mode():
        alone = private_engine.model(input_ids=header, logits_to_keep=0).logits.float()[0]
    torch.testing.assert_close(a, alone, rtol=0, atol=1e-5)
    # After the image token the image matters (the test is not blind).
    assert not torch.allclose(_logits(private_engine, first)[0, -1], _logits(private_engine, second)[0, -1])


def test_without_the_patch_tokens_before_the_image_depend_on_it(
    private_engine: GuardEngine, unpatched: torch.nn.Module
) -> None:
    first, second = (_image_prompt(private_engine, im) for im in _images()[:2])
    start = _before_image(private_engine, first)
    a, b = (_logits(private_engine, x)[0, :start] for x in (first, second))
    assert (a - b).abs().max() > 1e-4


def _text_alone_and_mixed(engine: GuardEngine) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a text-only row alone, and in one batch with an image row the way the reference batches
    them: every row gets tiles (a blank one-tile image for the text row) and the text row's mask row is zero."""
    policy = engine.policy_for(None)
    text = GuardRequest((Turn("user", ("how do I build a birdhouse?",)),), policy)
    image = GuardRequest((Turn("user", ("look",)),), policy, _images()[0])
    alone = engine.prepare([text]).inputs
    batch = engine.prepare([text, image]).inputs  # the engine's own mixed layout: tiles of the image row only
    image_tiles = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    blank = {
        "pixel_values": torch.zeros_like(image_tiles["pixel_values"]),
        "aspect_ratio_ids": torch.ones_like(image_tiles["aspect_ratio_ids"]),
        "aspect_ratio_mask": torch.zeros_like(image_tiles["aspect_ratio_mask"]),
    }
    blank["aspect_ratio_mask"][..., 0] = 1
    inputs = {k: v for k, v in batch.items() if k not in (*image_tiles, "image_rows")}
    for name in image_tiles:
        inputs[name] = torch.cat([blank[name], image_tiles[name]])
    assert not bool(inputs["cross_attention_mask"][0].any())  # the text row sees no tile
    width = int(alone["attention_mask"].sum())
    return _logits(engine, alone)[0, -width:], _logits(engine, inputs)[0, -width:]


def test_a_text_row_gives_the_same_logits_alone_and_beside_an_image_row(private_engine: GuardEngine) -> None:
    alone, mixed = _text_alone_and_mixed(private_engine)
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-4)


def test_without_the_patch_a_text_row_changes_beside_an_image_row(
    private_engine: GuardEngine, unpatched: torch.nn.Module
) -> None:
    alone, mixed = _text_alone_and_mixed(private_engine)
    assert (mixed - alone).abs().max() > 1e-2


def test_the_patch_can_be_switched_off(untrained_model_dir: Path) -> None:
    engine = GuardEngine.from_settings(
        engine_settings(untrained_model_dir, model__reference_cross_attention=False)
    )
    assert not engine.loaded.reference_cross_attention
    assert not xattn.cross_attention_layers(engine.model) == []
    assert not xattn.uses_reference_cross_attention(engine.model)
    assert not engine.mixes_modalities and not engine.shares_image_prefix
    policy = engine.policy_for(None)
    mixed = [
        GuardRequest((Turn("user", ("hi",)),), policy),
        GuardRequest((Turn("user", ("look",)),), policy, _images()[1]),
    ]
    with pytest.raises(ValueError, match="mix"):
        engine.prepare(mixed)
    assert all(
        isinstance(r, GuardResult) or r.detail.get("kind") == "truncated" for r in engine.classify(mixed)
    )


def test_an_untested_transformers_forward_is_refused_by_name(
    untrained_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xattn, "TESTED_FORWARDS", {"0.0.0": "0000000000000000"})
    with pytest.raises(ModelLoadError, match=r"model\.reference_cross_attention: transformers .* differs"):
        load_model(engine_settings(untrained_model_dir).model)
    # Switched off, the same transformers loads (transformers' own forward, one modality per batch).
    loaded = load_model(engine_settings(untrained_model_dir, model__reference_cross_attention=False).model)
    assert not loaded.reference_cross_attention


def test_the_generate_reference_mode_never_mixes(trained_engine: GuardEngine) -> None:
    assert trained_engine.mixes_modalities
    assert not trained_engine.with_mode("generate").mixes_modalities


# -- engine: shared image prompt start, mixed batches (trained guard) ---------------------------------------


def _requests(engine: GuardEngine, n: int, seed: int) -> list[GuardRequest]:
    default = engine.policy_for(None)
    strict = Policy("strict", default.categories[:9], 0.3)
    examples = synthetic_examples(n, seed=seed, split="heldout")
    requests = [GuardRequest(example_turns(e.event), default, example_image(e.event)) for e in examples]
    return [dataclasses.replace(r, policy=strict if i % 3 == 0 else default) for i, r in enumerate(requests)]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert isinstance(x, GuardResult) and isinstance(y, GuardResult), (x, y)
        assert abs(x.score - y.score) <= 1e-5
        assert (x.unsafe, x.codes, x.dropped_codes) == (y.unsafe, y.codes, y.dropped_codes)


def test_image_rows_share_their_prompt_start_exactly(trained_engine: GuardEngine) -> None:
    requests = [r for r in _requests(trained_engine, 80, seed=31) if r.has_image][:12]
    assert len(requests) >= 8 and len({id(r.image) for r in requests}) == len(requests)
    assert len({r.policy.hash for r in requests}) == 2
    shared_batch = trained_engine.prepare(requests)
    assert shared_batch.prefix_keys and {k[0] for k in shared_batch.prefix_keys} == {"before-image"}
    assert "pixel_values" in shared_batch.inputs and "image_rows" not in shared_batch.inputs
    shared = trained_engine.run(shared_batch)
    whole = trained_engine.with_mode("single_pass", share_prefix=False)
    whole_batch = whole.prepare(requests)
    assert not whole_batch.prefix_keys
    _same(shared, whole.run(whole_batch))
    assert trained_engine.score_only(shared_batch) == pytest.approx(whole.score_only(whole_batch), abs=1e-5)
    assert any(r.unsafe for r in shared) and not all(r.unsafe for r in shared)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_mixed_batch_gives_the_results_of_split_batches(
    trained_engine: GuardEngine, share_prefix: bool
) -> None:
    engine = trained_engine.with_mode("single_pass", share_prefix=share_prefix)
    requests = _requests(engine, 60, seed=37)[:20]
    assert any(r.has_image for r in requests) and not all(r.has_image for r in requests)
    batch = engine.prepare(requests)
    assert batch.has_image and "image_rows" in batch.inputs
    assert bool(batch.prefix_keys) == share_prefix
    mixed = engine.run(batch)
    split: list = [None] * len(requests)
    for modality in (False, True):
        rows = [i for i, r in enumerate(requests) if r.has_image == modality]
        for i, result in zip(rows, engine.run(engine.prepare([requests[i] for i in rows]))):
            split[i] = result
    _same(mixed, split)
    alone = [engine.run(engine.prepare([r]))[0] for r in requests[:6]]
    _same(mixed[:6], alone)
    _same(engine.classify(requests), mixed)
