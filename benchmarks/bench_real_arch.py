"""Real-architecture benchmark: the published Llama Guard 3 shapes with random weights, on whatever device runs it.

The tiny checkpoints say nothing about what an item costs on real hardware. This script instantiates the real
architectures from their published configs (decisions are meaningless, cost is real):

  - ``vision``: Llama Guard 3 11B Vision = ``MllamaForConditionalGeneration`` with the Llama-3.2-11B-Vision
    config (40 text layers, 8 of them cross-attention, hidden 4096; a 32 + 8 layer ViT-H/14 at 560-px tiles);
  - ``1b``: Llama Guard 3 1B = ``LlamaForCausalLM``, 16 layers, hidden 2048, untied 128k head;
  - ``8b``: Llama Guard 3 8B = ``LlamaForCausalLM``, 32 layers, hidden 4096 (Llama 3.1 8B);

and feeds them what the worker feeds the real models: ``GuardEngine.prepare`` renders the default policy's
prompt for synthetic conversations (about 200 prompt tokens), tokenizes them (the self-built tiny tokenizer:
Llama-3's split rules and special tokens, so token counts are close to the real tokenizer's) and tiles a
1024x768 photo into four 560-px tiles with the real Mllama image processor. It times ``score_only`` (the one
forward pass every item pays: P(unsafe) at the answer position; unsafe rows would add a short greedy decode,
but random weights make "unsafe" meaningless, so that is left out) and ``prepare`` (CPU) separately, per model,
modality (text-only, one image) and batch size, and prints items/s and latency.

On CUDA: bf16, SDPA attention, full layer count; ``--compile default`` wraps the forward in ``torch.compile``
and ``--compile reduce-overhead`` adds CUDA graphs (both recompile per new batch shape: the warm-up run pays
that). On CPU: fp32, a cut-down layer count (``--layers``, default 2: first layers of the real stack, at least
one cross-attention layer for Vision) and the vocabulary cut to the tokenizer's (``--vocab``), every other
dimension real — so CI proves the script works in seconds; the figures are then per cut-down model.

    .venv/bin/python benchmarks/bench_real_arch.py                     # CPU: cut-down, batch 1 and 4
    .venv/bin/python benchmarks/bench_real_arch.py --device cuda       # GPU: full models, batch 1, 8, 32
    .venv/bin/python benchmarks/bench_real_arch.py --device cuda --compile reduce-overhead
    .venv/bin/python benchmarks/bench_real_arch.py --json results.json # also write the rows as JSON

Never downloads anything: configs are written below, tokenizers come from the offline tiny-model build.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.config import load_settings
from worker.contracts.verdicts import ModelInfo
from worker.dev.tiny_model.build import ensure_tiny_model
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_turns
from worker.engine.engine import GuardEngine
from worker.engine.loading import LoadedModel, ModelLoadError, quiet_transformers, resolve_device
from worker.engine.policy import load_policies
from worker.engine.types import GuardRequest

# ---------------------------------------------------------------------------------------------- configs
# Values of the published config.json files (Hugging Face meta-llama/*), written out so nothing is fetched.

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Llama Guard 3 11B Vision (= Llama-3.2-11B-Vision's architecture).
VISION_TEXT = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_parameters": LLAMA3_ROPE,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
}
VISION_VISION = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "attention_heads": 16,
    "num_channels": 3,
    "image_size": 560,
    "patch_size": 14,
    "max_num_tiles": 4,
    "vision_output_dim": 7680,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
    "norm_eps": 1e-5,
    "hidden_act": "gelu",
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
VISION_IMAGE_TOKEN_INDEX = 128256

# Llama Guard 3 1B (Llama 3.2 1B shape with an untied output head) and 8B (Llama 3.1 8B).
TEXT_GUARDS = {
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_parameters": LLAMA3_ROPE,
    },
    "8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "rope_parameters": LLAMA3_ROPE,
    },
}
FAMILIES = {"vision": "llama-guard-3-vision", "1b": "llama-guard-3-1b", "8b": "llama-guard-3-8b"}
MODEL_NAMES = {
    "vision": "Llama Guard 3 11B Vision",
    "1b": "Llama Guard 3 1B",
    "8b": "Llama Guard 3 8B",
}
PHOTO_SIZE = (1024, 768)  # a typical chat photo: four 560-px tiles (2x2 canvas)


def cut_layers(real: int, layers: int | None) -> int:
    """The layer count to build: the real one, or ``layers`` when that is smaller."""
    return real if layers is None else max(1, min(real, layers))


def cross_attention_layers(total: int) -> list[int]:
    """The real stack's cross-attention indices below ``total``; the last layer if none is (an image must count)."""
    kept = [i for i in VISION_TEXT["cross_attention_layers"] if i < total]
    return kept or [total - 1]


def special_ids(tokenizer: Any) -> dict[str, Any]:
    """bos/eos/pad ids of the tokenizer (a cut vocabulary must not name ids past its end)."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }


def vision_config(layers: int | None, vocab: int | None, tile_size: int, ids: dict[str, Any]) -> Any:
    """MllamaConfig of Llama Guard 3 Vision, optionally cut to ``layers`` text layers (vision scaled alike)."""
    from transformers import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

    text_layers = cut_layers(VISION_TEXT["num_hidden_layers"], layers)
    fraction = text_layers / VISION_TEXT["num_hidden_layers"]
    local_layers = max(1, round(VISION_VISION["num_hidden_layers"] * fraction))
    global_layers = max(1, round(VISION_VISION["num_global_layers"] * fraction))
    vision_args = dict(VISION_VISION)
    vision_args.update(num_hidden_layers=local_layers, num_global_layers=global_layers, image_size=tile_size)
    # The vision tower hands the text stack these local layers' outputs (plus its last): keep the ones that exist.
    indices = [i for i in VISION_VISION["intermediate_layers_indices"] if i < local_layers] or [
        local_layers - 1
    ]
    vision_args["intermediate_layers_indices"] = indices
    vision_args["vision_output_dim"] = VISION_VISION["hidden_size"] * (len(indices) + 1)
    text_args = dict(VISION_TEXT)
    text_args.update(
        num_hidden_layers=text_layers, cross_attention_layers=cross_attention_layers(text_layers)
    )
    if vocab is not None:
        text_args.update(vocab_size=vocab, **ids)
    return MllamaConfig(
        vision_config=MllamaVisionConfig(**vision_args),
        text_config=MllamaTextConfig(**text_args),
        image_token_index=VISION_IMAGE_TOKEN_INDEX if vocab is None else vocab,
    )


def text_guard_config(name: str, layers: int | None, vocab: int | None, ids: dict[str, Any]) -> Any:
    """LlamaConfig of Llama Guard 3 1B or 8B, optionally cut to ``layers`` layers / the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    args = dict(TEXT_GUARDS[name])
    args["num_hidden_layers"] = cut_layers(args["num_hidden_layers"], layers)
    if vocab is not None:
        args.update(vocab_size=vocab, **ids)
    return LlamaConfig(**args)


# ---------------------------------------------------------------------------------------------- building


def build_model(name: str, config: Any, device: torch.device, dtype: torch.dtype, attn: str) -> Any:
    """Random-weight model of ``config`` built directly on ``device`` in ``dtype`` (no host detour for 21 GB)."""
    from transformers import LlamaForCausalLM, MllamaForConditionalGeneration

    cls = MllamaForConditionalGeneration if name == "vision" else LlamaForCausalLM
    config._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = attn
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    if name == "vision":
        # Trained checkpoints have open cross-attention gates; zero gates would skip the image's cost-free path.
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn_attn_gate.fill_(1.0)
                    layer.cross_attn_mlp_gate.fill_(1.0)
    return model.eval().requires_grad_(False)


def processor_for(name: str, tile_size: int) -> Any:
    """The worker's processor for the family, with the self-built tokenizer and the real Mllama tiling."""
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tiny_dir = ensure_tiny_model(train=False, family=FAMILIES[name])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    if name != "vision":
        return tokenizer
    image_processor = MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size}, max_image_tiles=VISION_VISION["max_num_tiles"]
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def engine_for(
    name: str, model: Any, processor: Any, device: torch.device, dtype: torch.dtype
) -> GuardEngine:
    """The project's engine on the random-weight model (answer prefix given: nothing to detect on noise)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**special_ids(getattr(processor, "tokenizer", processor)))
    settings = load_settings(
        None,
        model__path=f"random-{name}",
        model__family=FAMILIES[name],
        model__device=str(device),
        model__answer_prefix="\n\n",
    )
    parameters = sum(p.numel() for p in model.parameters())
    loaded = LoadedModel(processor, model, device, dtype, ModelInfo(f"random-{name}", None), 0.0, parameters)
    return GuardEngine(loaded, load_policies(settings, FAMILIES[name]), settings)


def photo(seed: int) -> Image.Image:
    """A 1024x768 RGB test photo (smooth noise: realistic for the tiler, nothing for the model to read)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand((3, 24, 32), generator=generator)
    big = torch.nn.functional.interpolate(small[None], size=PHOTO_SIZE[::-1], mode="bilinear")[0]
    array = (big.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def requests_for(engine: GuardEngine, count: int, with_image: bool) -> list[GuardRequest]:
    """``count`` synthetic text conversations under the default policy, each with one photo if ``with_image``."""
    policy = engine.policy_for(None)
    examples = [e for e in synthetic_examples(count * 3 + 8, seed=2026, split="heldout") if not e.has_image]
    return [
        GuardRequest(example_turns(e.event), policy, photo(i) if with_image else None)
        for i, e in enumerate(examples[:count])
    ]


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Row:
    """One measured (model, modality, batch size)."""

    model: str
    modality: str
    batch: int
    text_layers: int
    parameters: int
    prompt_tokens: float  # mean real (unpadded) tokens per row
    tiles: int  # image tiles per item (0 for text)
    prepare_ms_per_item: float
    forward_ms_p50: float  # one batch's forward pass, median
    forward_ms_max: float
    items_per_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    engine: GuardEngine, name: str, modality: str, batch_size: int, batches: int, repeats: int
) -> Row:
    """Prepare ``batches`` batches, then time ``score_only`` on each ``repeats`` times (after a warm-up pass)."""
    requests = requests_for(engine, batch_size * batches, modality == "image")
    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    started = time.perf_counter()
    prepared = [engine.prepare(chunk) for chunk in chunks]
    prepare_s = time.perf_counter() - started
    for batch in prepared:
        if batch.errors:
            raise RuntimeError(f"{name}/{modality}: prepare failed: {next(iter(batch.errors.values()))}")
    device = engine.loaded.device
    for batch in prepared:  # warm-up: kernels, allocator, compiled graphs, the shared-prefix cache
        engine.score_only(batch)
    synchronize(device)
    times = []
    for _ in range(repeats):
        for batch in prepared:
            t0 = time.perf_counter()
            engine.score_only(batch)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    # The mask covers a shared prompt start too: every row attends to all of its tokens.
    tokens = sum(float(b.inputs["attention_mask"].sum()) for b in prepared) / len(requests)
    tiles = int(prepared[0].inputs["aspect_ratio_mask"][0].sum()) if modality == "image" else 0
    text_config = getattr(engine.model.config, "text_config", engine.model.config)
    return Row(
        model=name,
        modality=modality,
        batch=batch_size,
        text_layers=text_config.num_hidden_layers,
        parameters=engine.loaded.parameters,
        prompt_tokens=round(tokens, 1),
        tiles=tiles,
        prepare_ms_per_item=round(1000 * prepare_s / len(requests), 2),
        forward_ms_p50=round(1000 * statistics.median(times), 2),
        forward_ms_max=round(1000 * max(times), 2),
        items_per_s=round(batch_size / statistics.median(times), 2),
    )


def print_row(row: Row) -> None:
    print(
        f"{row.model:6} {row.modality:6} {row.batch:>5} {row.text_layers:>6} {row.parameters / 1e9:>8.2f}B "
        f"{row.prompt_tokens:>7.0f} {row.tiles:>5} {row.prepare_ms_per_item:>11.1f} "
        f"{row.forward_ms_p50:>12.1f} {row.forward_ms_max:>11.1f} {row.items_per_s:>9.2f}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--models", default="vision,1b,8b", help="comma list of vision, 1b, 8b")
    parser.add_argument(
        "--modalities", default="text,image", help="comma list of text, image (image: vision)"
    )
    parser.add_argument(
        "--batch-sizes", default=None, help="comma list (default: 1,8,32 on CUDA, 1,4 on CPU)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="cut every stack to this many text layers (default: full on CUDA, 2 on CPU)",
    )
    parser.add_argument(
        "--full", action="store_true", help="full layer count even on CPU (slow, ~50 GB fp32)"
    )
    parser.add_argument(
        "--vocab",
        choices=("full", "tokenizer"),
        default=None,
        help="embedding/head size: the real 128,256 or the tokenizer's (default: full on CUDA, tokenizer on CPU)",
    )
    parser.add_argument("--tile-size", type=int, default=560, help="image tile size (the real model: 560)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    parser.add_argument(
        "--compile",
        default="none",
        choices=("none", "default", "reduce-overhead", "max-autotune"),
        help="torch.compile the forward (reduce-overhead = CUDA graphs); CUDA only",
    )
    parser.add_argument("--batches", type=int, default=2, help="distinct batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over those batches")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except ModelLoadError as exc:
        print(str(exc).replace("model.device", "--device"), file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    layers = None if (args.full or (on_gpu and args.layers is None)) else (args.layers or 2)
    vocab_mode = args.vocab or ("full" if on_gpu else "tokenizer")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,8,32" if on_gpu else "1,4")).split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = [m for m in models if m not in FAMILIES] + [m for m in modalities if m not in ("text", "image")]
    if unknown:
        print(f"unknown --models/--modalities entries: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.compile != "none" and not on_gpu:
        print("--compile is for CUDA runs (CPU inductor builds take minutes here)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        f"real-architecture benchmark: device {device} ({gpu}), dtype {str(dtype).removeprefix('torch.')}, "
        f"attention {args.attn}, compile {args.compile}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"layers: {'full (published configs)' if layers is None else f'cut down to {layers} text layers'}; "
        f"vocabulary: {vocab_mode}; tiles {args.tile_size}px; random weights (decisions meaningless, cost real)"
    )
    header = (
        f"{'model':6} {'input':6} {'batch':>5} {'layers':>6} {'params':>9} {'tokens':>7} {'tiles':>5} "
        f"{'prep ms/it':>11} {'fwd ms p50':>12} {'fwd ms max':>11} {'items/s':>9}"
    )
    print(header)
    print("-" * len(header))
    rows: list[Row] = []
    for name in models:
        processor = processor_for(name, args.tile_size)
        tokenizer = getattr(processor, "tokenizer", processor)
        vocab = None if vocab_mode == "full" else int(math.ceil(len(tokenizer) / 64) * 64)
        if name == "vision":
            config = vision_config(layers, vocab, args.tile_size, special_ids(tokenizer))
        else:
            config = text_guard_config(name, layers, vocab, special_ids(tokenizer))
        model = build_model(name, config, device, dtype, args.attn)
        if args.compile != "none":
            model.forward = torch.compile(model.forward, mode=args.compile)
        engine = engine_for(name, model, processor, device, dtype)
        for modality in modalities:
            if modality == "image" and name != "vision":
                continue  # Llama Guard 3 1B / 8B read no images
            for size in batch_sizes:
                row = measure(engine, name, modality, size, args.batches, args.repeats)
                rows.append(row)
                print_row(row)
        del engine, model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    print()
    for name in models:
        mine = [r for r in rows if r.model == name]
        if mine:
            best = max(mine, key=lambda r: r.items_per_s)
            print(
                f"{MODEL_NAMES[name]}: best {best.items_per_s:.2f} items/s ({best.modality}, batch {best.batch}); "
                f"batch-{min(batch_sizes)} latency "
                + ", ".join(
                    f"{r.modality} {r.forward_ms_p50:.0f} ms" for r in mine if r.batch == min(batch_sizes)
                )
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": str(device),
                    "device_name": gpu,
                    "dtype": str(dtype).removeprefix("torch."),
                    "layers": layers,
                    "vocab": vocab_mode,
                    "tile_size": args.tile_size,
                    "attention": args.attn,
                    "compile": args.compile,
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
