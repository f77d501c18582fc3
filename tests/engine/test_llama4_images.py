"""The PIL Llama 4 image processor and ``<|image|>`` expansion against transformers' own Llama 4 code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.llama4.processing_llama4 import Llama4Processor

from worker.engine.families.llama4_images import (
    Llama4PilImageProcessor,
    Llama4PilProcessor,
    best_fit,
    expand_image_ids,
    image_token_string,
    max_res_without_distortion,
    supported_resolutions,
)
from worker.engine.loading import _classes, _load_processor

RATIOS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (3, 1), (4, 4)]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("per_tile", [1, 4, 144])
def test_expansion_string_is_transformers_scheme(ratio: tuple[int, int], per_tile: int) -> None:
    # Llama4Processor._prompt_split_image uses no instance state: call it as transformers defines it.
    assert image_token_string(ratio, per_tile) == Llama4Processor._prompt_split_image(None, ratio, per_tile)


def test_expansion_by_id_matches_tokenized_transformers_string(untrained_lg4_dir: Path) -> None:
    processor = Llama4PilProcessor.from_pretrained(untrained_lg4_dir)
    tok = processor.tokenizer
    ratios = [(2, 2), (1, 1), (1, 3)]
    per_tile = processor.patches_per_tile
    text = "a<|image|>b<|image|><|image|>c"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = text.split("<|image|>")
    expected_text = pieces[0] + "".join(
        Llama4Processor._prompt_split_image(None, ratio, per_tile) + piece
        for ratio, piece in zip(ratios, pieces[1:])
    )
    expected = tok(expected_text, add_special_tokens=False)["input_ids"]
    assert expand_image_ids(ids, ratios, per_tile, processor.token_ids) == expected
    with pytest.raises(ValueError, match="number of <\\|image\\|> tokens"):
        expand_image_ids(ids, ratios[:2], per_tile, processor.token_ids)


def test_resolution_helpers_follow_the_reference_examples() -> None:
    # The examples in transformers' image_processing_llama4 docstrings.
    assert set(supported_resolutions(5, 224)) == {
        (224, 896),
        (448, 448),
        (224, 224),
        (896, 224),
        (224, 672),
        (672, 224),
        (224, 448),
        (448, 224),
        (224, 1120),
        (1120, 224),
    }
    assert best_fit((200, 300), [(224, 672), (672, 224), (224, 448), (448, 224), (224, 224)]) == (224, 448)
    assert max_res_without_distortion((200, 300), (450, 200)) == (133, 200)
    assert max_res_without_distortion((800, 600), (450, 1300)) == (450, 337)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((40, 40), (1, 1)), ((120, 60), (1, 2)), ((60, 120), (2, 1)), ((100, 130), (2, 2)), ((500, 90), (1, 4))],
)
def test_tiles_and_aspect_ratios(size: tuple[int, int], grid: tuple[int, int]) -> None:
    processor = Llama4PilImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    image = Image.new("RGB", size, (255, 255, 255))
    out = processor([image, image])
    tiles = grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0)  # + the global view
    assert out["aspect_ratios"].tolist() == [list(grid)] * 2
    assert out["pixel_values"].shape == (2 * tiles, 3, 56, 56)
    assert out["pixel_values"].dtype == torch.bfloat16
    # White image -> 1.0 where the image is, black padding -> -1.0 (normalised with mean = std = 0.5).
    assert float(out["pixel_values"].max()) == 1.0
    if size == (100, 130):  # 100x130 fits 86x112 in a 112x112 canvas: black padding on the right
        assert float(out["pixel_values"].min()) == -1.0


def test_matches_transformers_image_processor_where_torchvision_exists() -> None:
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: transformers' Llama4ImageProcessor cannot run here")
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    ours = Llama4PilImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    theirs = Llama4ImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    for size in [(40, 40), (120, 60), (100, 130), (500, 90)]:
        image = Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 50).convert("RGB")
        a, b = ours([image]), theirs([image], return_tensors="pt")
        assert a["aspect_ratios"].tolist() == b["aspect_ratios"].tolist()
        assert a["pixel_values"].shape == b["pixel_values"].shape
        # Resampling kernels differ slightly between PIL and torchvision.
        assert (a["pixel_values"].float() - b["pixel_values"].float()).abs().mean() < 0.05


def test_loader_reads_the_checkpoint_files_with_the_right_processor(untrained_lg4_dir: Path) -> None:
    processor_class, model_class = _classes("llama4")
    processor = _load_processor(processor_class, "llama4", str(untrained_lg4_dir), {"local_files_only": True})
    if importlib.util.find_spec("torchvision") is None:
        assert isinstance(processor, Llama4PilProcessor)
    else:
        assert type(processor).__name__ == "Llama4Processor"
    assert processor.image_processor.size == {"height": 56, "width": 56}
    assert processor.patch_size == 14 and processor.downsample_ratio == 4
    assert issubclass(model_class, __import__("transformers").Llama4ForConditionalGeneration)


def test_untrained_lg4_forward_reads_several_images(untrained_lg4_dir: Path) -> None:
    """Smoke test of the whole image path (engine prepare -> Llama 4 forward), independent of training."""
    from worker.config import load_settings
    from worker.contracts.events import Turn
    from worker.engine.engine import GuardEngine
    from worker.engine.types import GuardRequest, GuardResult

    engine = GuardEngine.from_settings(
        load_settings(model__path=str(untrained_lg4_dir), model__device="cpu", model__family="llama-guard-4")
    )
    policy = engine.policy_for(None)
    turns = (Turn(role="user", texts=("look at these",)),)
    red, blue = Image.new("RGB", (120, 60), (220, 20, 20)), Image.new("RGB", (100, 130), (20, 20, 220))
    requests = [
        GuardRequest(turns, policy, images=(red,)),
        GuardRequest(turns, policy, images=(blue, red, blue)),
        GuardRequest(turns, policy, images=(red, red)),
    ]
    batch = engine.prepare(requests)
    patch = engine.tokenizer.convert_tokens_to_ids("<|patch|>")
    # 1x2 grid + global = 3 tiles; 2x2 + global = 5 tiles; 4 patch tokens per tile.
    tiles = [3, 5 + 3 + 5, 3 + 3]
    assert batch.inputs["pixel_values"].shape[0] == sum(tiles)
    assert (batch.inputs["input_ids"] == patch).sum(dim=1).tolist() == [4 * t for t in tiles]
    results = engine.run(batch)
    assert all(isinstance(r, GuardResult) for r in results), results
    scores = [r.score for r in results]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len({round(s, 6) for s in scores}) > 1  # the images reach the logits
