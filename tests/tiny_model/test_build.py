"""The tiny checkpoint builds deterministically, loads like a hub checkpoint, and sees images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, MllamaForConditionalGeneration, MllamaProcessor

from worker.dev.tiny_model.build import (
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tiny_model_command,
    cache_root,
    default_recipe,
    ensure_tiny_model,
    read_recipe,
)

PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|> Task: Check if there is unsafe content"
    " in 'User' messages.<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
)


def weights_digest(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(model_dir / "model.safetensors").items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_untrained_builds_are_identical(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", train=False)
    second = build_tiny_model(tmp_path / "b", train=False)
    assert weights_digest(first) == weights_digest(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert (
        read_recipe(first)["recipe_hash"]
        == read_recipe(second)["recipe_hash"]
        == default_recipe(train=False).hash
    )


def test_build_reuses_a_current_checkpoint_and_force_rebuilds(tmp_path: Path, capsys) -> None:
    out = build_tiny_model(tmp_path / "m", train=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model_command(out, train=False, force=False) == 0
    assert "reused" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert build_tiny_model_command(out, train=False, force=True) == 0
    printed = capsys.readouterr().out
    assert "built" in printed and "parameters" in printed and "size on disk" in printed
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.building-")]


def test_cache_directory_is_named_by_recipe_hash(untrained_model_dir: Path) -> None:
    assert untrained_model_dir == cache_root() / f"tiny-guard-{default_recipe(train=False).hash}"
    stamp = (untrained_model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(train=False) == untrained_model_dir
    assert (untrained_model_dir / "model.safetensors").stat().st_mtime_ns == stamp, "built once, then reused"
    assert default_recipe(train=False).hash != default_recipe(train=True).hash
    recipe = json.loads((untrained_model_dir / "recipe.json").read_text())
    assert recipe["trained"] is False and recipe["recipe"]["text_hidden"] == 64
    assert "tiny" in (untrained_model_dir / "README.md").read_text()


def test_special_tokens_are_single_ids(untrained_model_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(untrained_model_dir, local_files_only=True).tokenizer
    ids = {}
    for token in (*SPECIAL_TOKENS, IMAGE_TOKEN):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(encoded) == 1, token
        ids[token] = encoded[0]
    assert len(set(ids.values())) == len(ids)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and tokenizer.padding_side == "left"
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|eot_id|>"
    # The verdict words are single tokens, as in Llama-3's vocabulary (the score reads P(`unsafe`)).
    for word in ("safe", "unsafe"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_loads_with_from_pretrained(untrained_model_dir: Path) -> None:
    processor = MllamaProcessor.from_pretrained(untrained_model_dir, local_files_only=True)
    model = MllamaForConditionalGeneration.from_pretrained(untrained_model_dir, local_files_only=True)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.image_processor.size["height"] == 56 and processor.image_processor.max_image_tiles == 4
    gates = [
        layer.cross_attn_attn_gate
        for layer in model.model.language_model.layers
        if hasattr(layer, "cross_attn_attn_gate")
    ]
    assert gates and all(float(gate.detach().abs().min()) > 0 for gate in gates)


def test_image_changes_the_logits(untrained_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(untrained_model_dir, local_files_only=True)
    model = MllamaForConditionalGeneration.from_pretrained(untrained_model_dir, local_files_only=True).eval()
    red = Image.new("RGB", (100, 60), (220, 20, 20))
    blue = Image.new("RGB", (100, 60), (20, 20, 220))
    with torch.inference_mode():
        logits = [
            model(
                **processor(images=[[image]], text=[PROMPT], add_special_tokens=False, return_tensors="pt")
            ).logits[0, -1]
            for image in (red, blue)
        ]
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3


def test_text_guard_builds_deterministically_and_loads_like_a_hub_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = build_tiny_model(tmp_path / "a", train=False, family="llama-guard-3-8b")
    second = build_tiny_model(tmp_path / "b", train=False, family="llama-guard-3-1b")
    assert weights_digest(first) == weights_digest(second)  # one text guard serves both families
    recipe = read_recipe(first)
    assert recipe["family"] == "llama-guard-3-1b" and recipe["serves"] == [
        "llama-guard-3-1b",
        "llama-guard-3-8b",
    ]
    model = AutoModelForCausalLM.from_pretrained(first, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(first, local_files_only=True)
    assert IMAGE_TOKEN not in tokenizer.get_vocab()  # like Llama Guard 3 1B/8B
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
    assert default_recipe(family="llama-guard-3-8b").hash != default_recipe().hash


def test_build_command_names_unbuildable_families(tmp_path: Path, capsys) -> None:
    assert build_tiny_model_command(tmp_path / "x", train=False, family="llama-guard-9") == 2
    assert "buildable: llama-guard-3-vision" in capsys.readouterr().out


def test_lg4_builds_deterministically_and_loads_like_a_hub_checkpoint(
    tmp_path: Path, untrained_lg4_dir: Path
) -> None:
    from transformers import AutoConfig, AutoTokenizer, Llama4ForConditionalGeneration

    from worker.dev.tiny_model.build import LLAMA4_SPECIAL_TOKENS
    from worker.engine.families.llama4_images import Llama4PilProcessor

    again = build_tiny_model(tmp_path / "lg4", train=False, family="llama-guard-4")
    assert weights_digest(again) == weights_digest(untrained_lg4_dir)
    recipe = read_recipe(again)
    assert recipe["family"] == "llama-guard-4" and recipe["serves"] == ["llama-guard-4"]
    config = AutoConfig.from_pretrained(again, local_files_only=True)
    assert config.model_type == "llama4"
    # A null chunk size breaks Llama 4's chunked-attention mask: the recipe sets it.
    assert config.text_config.attention_chunk_size == 4096
    assert config.image_token_id == AutoTokenizer.from_pretrained(again).convert_tokens_to_ids("<|patch|>")
    model = Llama4ForConditionalGeneration.from_pretrained(again, local_files_only=True)
    assert type(model).__name__ == "Llama4ForConditionalGeneration"
    tokenizer = AutoTokenizer.from_pretrained(again, local_files_only=True)
    for token in LLAMA4_SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
    assert "<|eot_id|>" not in tokenizer.get_vocab()  # Llama 4's tokens, not Llama 3's
    files = {p.name for p in again.iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "tokenizer.json", "config.json"} <= files
    preprocessor = json.loads((again / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "Llama4ImageProcessorFast"  # the real checkpoint's name
    processor = Llama4PilProcessor.from_pretrained(again)
    assert processor.patches_per_tile == 4  # (56 / 14)^2 / 4 after the pixel shuffle
    assert default_recipe(family="llama-guard-4").hash not in {
        default_recipe().hash,
        default_recipe(family="llama-guard-3-1b").hash,
    }


def test_the_vision_recipe_trains_under_the_reference_cross_attention() -> None:
    import dataclasses

    from worker.dev.tiny_model.build import build_config, build_model, build_tokenizer
    from worker.engine.families.mllama_cross_attention import uses_reference_cross_attention

    recipe = dataclasses.replace(
        default_recipe(train=False), tokenizer_corpus_examples=50, template_corpus_weight=5
    )
    config = build_config(recipe, build_tokenizer(recipe))
    assert uses_reference_cross_attention(build_model(recipe, config))
    off = dataclasses.replace(recipe, reference_cross_attention=False)
    assert not uses_reference_cross_attention(build_model(off, config))
    # The switch names another Vision checkpoint; the other families' recipes (and caches) do not see it.
    assert (
        default_recipe().hash != dataclasses.replace(default_recipe(), reference_cross_attention=False).hash
    )
    for family in ("llama-guard-3-1b", "llama-guard-4"):
        recipe = default_recipe(family=family)
        assert recipe.hash == dataclasses.replace(recipe, reference_cross_attention=False).hash
