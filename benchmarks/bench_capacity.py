"""Capacity of each Llama Guard family: model FLOPs per item and projected items/s per GPU.

Run: .venv/bin/python benchmarks/bench_capacity.py [--utilisation 0.4] [--peak-tflops 989] [--text-tokens 450]
     [--image-share 0.1]

Each architecture is instantiated from its published configuration on torch's ``meta`` device (shapes, no
weights, no download), and every ``nn.Linear`` is charged ``2 * in * out`` FLOPs per token that passes
through it; attention scores (``QK^T`` and ``AV``) are added from the sequence lengths. Parameters and bf16
weight memory come from the same instantiated model. Printed per family and modality:

  params, bf16 weights, tokens through the decoder (and the vision encoder), GFLOPs per item, and the
  PROJECTED items/s per GPU at the stated utilisation of the stated peak (default: 40 % of an H100 SXM's
  989 dense bf16 TFLOP/s).

Projections, not measurements: no GPU exists on the machine that runs this. They bound throughput from
compute alone (one forward pass per item: the single-pass score; decoding for unsafe items and image
preprocessing are extra). Assumptions, all printed and all flags:
  - a text item is ``--text-tokens`` prompt tokens (the template with 13-14 category definitions is
    ≈350 tokens, plus ≈100 of conversation);
  - logits are taken at the last position only (the score position);
  - an image item is one 1024x768 photo: Mllama tiles it into 4 tiles of 560 px (``max_num_tiles``);
    Llama 4's processor into 2x2 tiles of 336 px plus one global view (5 tiles of 144 tokens after pixel
    shuffle, each in the decoder's sequence).

Finally: what routing text-only events to the 1B guard buys for a stream with ``--image-share`` images,
against sending everything to Vision (the single-model deployment).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

# Published configurations (key numbers only; everything else is transformers' default for the class).
# Llama Guard 3 1B = the Llama 3.2 1B shape (huggingface.co/meta-llama/Llama-3.2-1B config.json; the guard's
# own card lists 1.5B parameters because its output head is not tied to the embeddings).
LG3_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
# Llama Guard 3 8B = the Llama 3.1 8B shape (huggingface.co/meta-llama/Llama-3.1-8B config.json).
LG3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
# Llama Guard 3 11B Vision = Llama 3.2 11B Vision, Mllama (huggingface.co/meta-llama/Llama-3.2-11B-Vision
# config.json: 40 text layers of which 8 cross-attention layers, 560-px tiles, at most 4 tiles).
LG3_VISION_TEXT = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
}
LG3_VISION_VISION = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "num_attention_heads": 16,
    "image_size": 560,
    "patch_size": 14,
    "max_num_tiles": 4,
    "vision_output_dim": 7680,
}
# Llama Guard 4 12B: Llama 4 Scout (huggingface.co/meta-llama/Llama-4-Scout-17B-16E config.json) pruned to a
# dense model — the routed experts removed, the shared expert kept (Hugging Face's "Welcoming Llama Guard 4"
# post, 2025-04-29): so every layer is a dense MLP of the shared expert's width (intermediate_size 8192).
# The count below lands on ≈12B, which is the check that this reading of the pruning is right.
LG4_TEXT = {
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 8192,
    "moe_layers": [],
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 202048,
    "attention_chunk_size": 8192,
}
LG4_VISION = {
    "hidden_size": 1408,
    "intermediate_size": 5632,
    "num_hidden_layers": 34,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096,
    "projector_output_dim": 4096,
    "vision_output_dim": 4096,
}

MLLAMA_TILES = 4  # a 1024x768 photo at 560-px tiles, max_num_tiles = 4
LG4_TILES = 5  # 2x2 tiles of 336 px + one global view


@dataclass
class Family:
    """One architecture on the meta device and how tokens flow through it."""

    name: str
    model: nn.Module
    text_only: bool


def build_families() -> list[Family]:
    """Every family's model, instantiated on the meta device from the dicts above (no weights)."""
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        LlamaConfig,
        LlamaForCausalLM,
        MllamaConfig,
        MllamaForConditionalGeneration,
    )

    with torch.device("meta"):
        return [
            Family("llama-guard-3-1b", LlamaForCausalLM(LlamaConfig(**LG3_1B)), True),
            Family("llama-guard-3-8b", LlamaForCausalLM(LlamaConfig(**LG3_8B)), True),
            Family(
                "llama-guard-3-vision",
                MllamaForConditionalGeneration(
                    MllamaConfig(text_config=LG3_VISION_TEXT, vision_config=LG3_VISION_VISION)
                ),
                False,
            ),
            Family(
                "llama-guard-4",
                Llama4ForConditionalGeneration(Llama4Config(text_config=LG4_TEXT, vision_config=LG4_VISION)),
                False,
            ),
        ]


def params(model: nn.Module) -> int:
    """Parameters of ``model`` (meta tensors know their shapes)."""
    return sum(p.numel() for p in model.parameters())


def _is_vision(name: str) -> bool:
    return "vision" in name or "multi_modal_projector" in name


def _config(model: nn.Module, part: str):
    config = model.config
    return getattr(config, part, config)


def linear_flops(model: nn.Module, *, text_tokens: int, vision_tokens: int, image: bool) -> float:
    """``2 * in * out`` per token through every ``nn.Linear`` that the item's forward pass uses."""
    text_cfg = _config(model, "text_config")
    cross_layers = set(getattr(text_cfg, "cross_attention_layers", None) or [])
    total = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        per_token = 2.0 * module.in_features * module.out_features
        if name.endswith("lm_head"):
            total += per_token  # the score is read at one position
        elif _is_vision(name):
            total += per_token * vision_tokens if image else 0.0
        elif cross_layers and ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            if layer in cross_layers:
                if not image:
                    continue  # text-only rows skip Mllama's cross-attention layers
                # k/v project the vision states; q/o and the MLP run on the text tokens.
                tokens = vision_tokens if name.endswith(("k_proj", "v_proj")) else text_tokens
                total += per_token * tokens
            else:
                total += per_token * text_tokens
        else:
            total += per_token * text_tokens
    return total


def attention_flops(
    model: nn.Module, *, text_tokens: int, vision_tokens: int, tile_tokens: int, image: bool
) -> float:
    """``QK^T`` + ``AV`` FLOPs: causal self-attention in the decoder, full attention in the vision encoder."""
    text_cfg = _config(model, "text_config")
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    width = heads * head_dim
    cross_layers = list(getattr(text_cfg, "cross_attention_layers", None) or [])
    self_layers = text_cfg.num_hidden_layers - len(cross_layers)
    total = self_layers * 2.0 * text_tokens * text_tokens * width  # causal: half of 4*T^2*d
    if image and cross_layers:
        total += len(cross_layers) * 4.0 * text_tokens * vision_tokens * width
    if image and hasattr(model.config, "vision_config"):
        vision = model.config.vision_config
        layers = vision.num_hidden_layers + getattr(vision, "num_global_layers", 0)
        sequence = tile_tokens  # attention span: one tile (Llama 4) or all tiles of the image (Mllama)
        total += layers * 4.0 * sequence * sequence * vision.hidden_size * (vision_tokens / sequence)
    return total


def item_shape(family: Family, image: bool, text_tokens: int) -> tuple[int, int, int]:
    """(decoder tokens, vision-encoder tokens, attention span in the vision encoder) for one item."""
    if not image:
        return text_tokens, 0, 0
    vision = family.model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1  # + the class token
    if family.name == "llama-guard-3-vision":
        encoder = MLLAMA_TILES * patches
        return text_tokens + 1, encoder, encoder  # one <|image|> token; all tiles attend jointly
    per_tile_in_decoder = int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)
    decoder = text_tokens + LG4_TILES * (per_tile_in_decoder + 2)  # + tile separators
    return decoder, LG4_TILES * patches, patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak FLOP/s achieved")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--text-tokens", type=int, default=450, help="prompt tokens of a text item")
    parser.add_argument("--image-share", type=float, default=0.1, help="share of events with an image")
    args = parser.parse_args()

    achieved = args.peak_tflops * 1e12 * args.utilisation
    print(
        f"capacity — PROJECTED from model FLOPs at {args.utilisation:.0%} of {args.peak_tflops:.0f} TFLOP/s "
        f"bf16 ({achieved / 1e12:.0f} TFLOP/s achieved); text item = {args.text_tokens} tokens"
    )
    header = (
        f"{'family':22} {'params':>8} {'bf16 GB':>8} {'modality':>8} {'decoder tok':>11} {'vision tok':>10} "
        f"{'GFLOP/item':>10} {'items/s/GPU (proj.)':>20}"
    )
    print(header)
    print("-" * len(header))
    cost: dict[tuple[str, str], float] = {}
    for family in build_families():
        n = params(family.model)
        for modality in ("text",) if family.text_only else ("text", "image"):
            image = modality == "image"
            decoder, vision_tokens, span = item_shape(family, image, args.text_tokens)
            flops = linear_flops(family.model, text_tokens=decoder, vision_tokens=vision_tokens, image=image)
            flops += attention_flops(
                family.model, text_tokens=decoder, vision_tokens=vision_tokens, tile_tokens=span, image=image
            )
            cost[(family.name, modality)] = flops
            print(
                f"{family.name:22} {n / 1e9:7.2f}B {n * 2 / 1e9:8.1f} {modality:>8} {decoder:11d} "
                f"{vision_tokens:10d} {flops / 1e9:10.1f} {achieved / flops:20.0f}"
            )

    share = args.image_share
    print(f"\nrouting — a stream with {share:.0%} image events, GPU-seconds per million events (projected):")
    plans = {
        "everything to Vision (one model)": (
            ("llama-guard-3-vision", "text"),
            ("llama-guard-3-vision", "image"),
        ),
        "text -> LG3-8B, images -> Vision": (("llama-guard-3-8b", "text"), ("llama-guard-3-vision", "image")),
        "text -> LG3-1B, images -> Vision": (("llama-guard-3-1b", "text"), ("llama-guard-3-vision", "image")),
        "everything to Llama Guard 4": (("llama-guard-4", "text"), ("llama-guard-4", "image")),
        "text -> LG3-1B, images -> LG4": (("llama-guard-3-1b", "text"), ("llama-guard-4", "image")),
    }
    baseline = None
    for label, (text_key, image_key) in plans.items():
        per_event = (1 - share) * cost[text_key] + share * cost[image_key]
        gpu_seconds = per_event * 1e6 / achieved
        baseline = baseline or gpu_seconds
        print(
            f"  {label:34} {gpu_seconds:9.0f} GPU-s   {baseline / gpu_seconds:5.2f}x the one-model capacity"
        )


if __name__ == "__main__":
    main()
