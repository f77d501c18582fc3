"""Build the tiny guard checkpoints: tokenizer, image processor, model — offline, seeded, in seconds.

One checkpoint per architecture of the Llama Guard family (``TinyRecipe.family``):

- ``llama-guard-3-vision``: the real Llama Guard 3 Vision *shape* (MllamaForConditionalGeneration +
  MllamaProcessor, Llama-3 special tokens, byte-level BPE, tiled images, cross-attention layers);
- ``llama-guard-3-1b``: a text guard, ``LlamaForCausalLM`` + a Llama-3 tokenizer without ``<|image|>``,
  trained on both the Llama Guard 3 1B and 8B prompts (the two models differ only in prompt), so it serves
  either family;

each at a size that builds and trains on a laptop CPU. ``ensure_tiny_model`` caches builds under
``~/.cache/moderation-worker/tiny-guard-<recipehash>`` (``MW_CACHE_DIR`` overrides the root), built once per
machine: in a temporary directory, then renamed, under a file lock so concurrent test processes wait
instead of building twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    Llama4Config,
    Llama4TextConfig,
    Llama4VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from worker.dev.tiny_model import synthetic
from worker.engine.families import LG3_1B, LG3_8B, LG4, VISION
from worker.engine.families.llama4_images import Llama4PilImageProcessor, Llama4PilProcessor
from worker.engine.families.llama4_model import GuardLlama4ForConditionalGeneration

logger = logging.getLogger(__name__)

# Bump when a code change alters what a build produces (enters the recipe hash, so caches refresh).
CODE_VERSION = 1
# Bump when the text guard's or Llama Guard 4's training changes (enters only their recipe hashes).
# 2: shared prompt starts computed once per batch; one torch thread; recipes retuned for the shorter run.
FAMILY_TRAIN_VERSION = 2
MODEL_ID = "tiny-guard"
# The families each tiny checkpoint is trained to serve (prompts of all of them in its training data).
SERVED_FAMILIES: dict[str, tuple[str, ...]] = {VISION: (VISION,), LG3_1B: (LG3_1B, LG3_8B), LG4: (LG4,)}
BUILDABLE_FAMILIES: dict[str, str] = {
    VISION: VISION,
    LG3_1B: LG3_1B,
    LG3_8B: LG3_1B,
    LG4: LG4,
}  # family -> checkpoint
RECIPE_FILE = "recipe.json"

# Llama-3's special tokens, in Llama-3's order (ids 128000.. in the real vocabulary; here they follow the
# BPE vocabulary). <|image|> comes last, one past the LM head, as in Llama 3.2 Vision (id 128256).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|reserved_special_token_4|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_6|>",
)
IMAGE_TOKEN = "<|image|>"
# Llama 4's special tokens that Llama Guard 4's prompt and image expansion use (ids follow the BPE vocabulary).
LLAMA4_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|image|>",
    "<|patch|>",
)
LLAMA4_EOS_TOKEN = "<|eot|>"
LLAMA4_PAD_TOKEN = "<|finetune_right_pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

# Llama-3's pre-tokenizer split pattern (tiktoken cl100k-style), so token boundaries behave like the real model's.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Fixed phrases of the Llama Guard 3 prompt format and category names, so the BPE vocabulary covers them well.
TEMPLATE_CORPUS: tuple[str, ...] = (
    (
        "Task: Check if there is unsafe content in 'User' messages in conversations according our safety policy "
        "with the below categories."
    ),
    (
        "Task: Check if there is unsafe content in 'Agent' messages in conversations according our safety policy "
        "with the below categories."
    ),
    (
        "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\n"
        "S4: Child Exploitation.\nS5: Defamation.\nS6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\n"
        "S9: Indiscriminate Weapons.\nS10: Hate.\nS11: Self-Harm.\nS12: Sexual Content.\nS13: Elections.\n"
        "<END UNSAFE CONTENT CATEGORIES>"
    ),
    "<BEGIN CONVERSATION>\n\nUser: hello\n\nAgent: hi\n\n<END CONVERSATION>",
    (
        "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories. "
    ),
    "Provide your safety assessment for ONLY THE LAST Agent message in the above conversation:",
    "\n\nsafe",
    "\n\nunsafe\nS1",
    "\n\nunsafe\nS9",
    "\n\nunsafe\nS10",
    "\n\nunsafe\nS13",
    "\n\nunsafe\nS1,S9",
)
# What the Llama Guard 3 8B prompt adds (the text guard learns both prompts).
TEXT_TEMPLATE_CORPUS: tuple[str, ...] = (
    " <BEGIN UNSAFE CONTENT CATEGORIES>\nS13: Elections.\nS14: Code Interpreter Abuse.\n",
    "list of violated categories.",
)


# Llama Guard 4's wording ("according to our", S14) and its message ending (a literal backslash-n pair twice).
LG4_TEMPLATE_CORPUS: tuple[str, ...] = (
    (
        "Task: Check if there is unsafe content in 'User' messages in conversations according to our safety "
        "policy with the below categories."
    ),
    (
        "Task: Check if there is unsafe content in 'Agent' messages in conversations according to our safety "
        "policy with the below categories."
    ),
    "S13: Elections.\nS14: Code Interpreter Abuse.\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n",
    "User: hello\\n\\n\n\nAgent: hi\\n\\n\n\n<END CONVERSATION>",
)


def _library_versions() -> tuple[str, ...]:
    return tuple(f"{name}=={version(name)}" for name in ("torch", "transformers", "tokenizers", "pillow"))


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of the brief CPU training run (see ``worker.dev.tiny_model.train``)."""

    seed: int = 1234
    examples: int = 1280
    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    threads: int = 2
    heldout_examples: int = 240
    heldout_seed: int = 99


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the checkpoint's bytes; its hash names the cache directory."""

    seed: int = 0
    family: str = VISION  # which checkpoint (see the module docstring); left out of the hash for Vision
    bpe_vocab_size: int = 2048
    text_hidden: int = 64
    text_layers: int = 4
    cross_attention_layers: tuple[int, ...] = (2,)
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_position_embeddings: int = 4096
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_global_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int = 64
    intermediate_layers_indices: tuple[int, ...] = (0, 1)
    tile_size: int = 56
    patch_size: int = 14
    max_image_tiles: int = 4
    # tanh(1.0) ≈ 0.76: the image reaches the text stream from the start (zero gates would ignore it).
    cross_attention_gate: float = 1.0
    # Vision: train (and evaluate) under Meta's reference cross-attention masking, the engine's default forward.
    reference_cross_attention: bool = True
    tokenizer_corpus_examples: int = 600
    template_corpus_weight: int = 200
    synthetic_version: int = synthetic.GENERATOR_VERSION
    code_version: int = CODE_VERSION
    # Library upgrades may change tokenizer training, init or training numerics: rebuild then, too.
    libraries: tuple[str, ...] = field(default_factory=_library_versions)
    train: TrainRecipe | None = field(default_factory=TrainRecipe)

    def as_dict(self) -> dict[str, object]:
        """The recipe as plain JSON-able data (what ``recipe.json`` records)."""
        data = asdict(self)
        if self.family == VISION:
            del data["family"]  # the Vision recipe predates families: keep its hash (and cached builds)
        else:
            del data["reference_cross_attention"]  # Mllama-only: the other recipes keep their hashes
            if self.train is not None:
                # Changes to the text guard's and Llama Guard 4's training code rebuild only those checkpoints.
                data["family_train_version"] = FAMILY_TRAIN_VERSION
        return data

    @property
    def hash(self) -> str:
        """Stable short hex digest of the recipe (cache key)."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def checkpoint_family(family: str) -> str:
    """The tiny checkpoint that serves ``family`` (Llama Guard 3 1B and 8B share the text guard)."""
    try:
        return BUILDABLE_FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"no tiny checkpoint for family {family!r}; buildable: {', '.join(BUILDABLE_FAMILIES)}"
        ) from None


def default_recipe(*, train: bool = True, family: str = VISION) -> TinyRecipe:
    """The project's recipe for ``family``; ``train=False`` gives the untrained (random-weights) variant."""
    family = checkpoint_family(family)
    if family == VISION:
        return TinyRecipe() if train else TinyRecipe(train=None)
    if family == LG4:
        # Short on purpose (2 shared CPU cores): text and image items, the Vision recipe's sizes. One thread:
        # at these sizes a second one gains almost nothing and, on a busy machine, spins (CPU time x5-8).
        # 8 epochs: at 6 the image decisions swung between 0.92 and 0.98 with the thread count's numerics.
        lg4_training = TrainRecipe(examples=768, epochs=8, learning_rate=4e-3, threads=1)
        # vision_intermediate = 4 x vision_hidden: Llama 4's pixel-shuffle adapter reads 4x the channels.
        return TinyRecipe(family=family, vision_intermediate=128, train=lg4_training if train else None)
    # A text guard learns the toy policy from shorter steps than the Vision one (no images; shared prompt
    # starts halve the tokens per step); one thread, as Llama Guard 4.
    text_training = TrainRecipe(examples=768, epochs=5, learning_rate=4e-3, threads=1)
    return TinyRecipe(family=family, train=text_training if train else None)


def cache_root() -> Path:
    """Where cached checkpoints live: ``$MW_CACHE_DIR`` or ``~/.cache/moderation-worker``."""
    return Path(os.environ.get("MW_CACHE_DIR", Path.home() / ".cache" / "moderation-worker"))


# ---------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_corpus(recipe: TinyRecipe) -> Iterator[str]:
    # The prompt template dominates every input: weighting it makes its words single tokens (short
    # sequences, fast training) and makes `unsafe` one token, as in Llama-3's vocabulary.
    for _ in range(recipe.template_corpus_weight):
        yield from TEMPLATE_CORPUS
        if recipe.family != VISION:
            yield from TEXT_TEMPLATE_CORPUS
        if recipe.family == LG4:
            yield from LG4_TEMPLATE_CORPUS
    for example in synthetic.synthetic_examples(
        recipe.tokenizer_corpus_examples, seed=recipe.seed, split="train"
    ):
        for message in example.event["messages"]:
            content = message["content"]
            if isinstance(content, str):
                yield content
            else:
                yield from (part["text"] for part in content if part["type"] == "text")


def build_tokenizer(recipe: TinyRecipe) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer shaped like Llama-3's: same split regex, special tokens, BOS template."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(list(_tokenizer_corpus(recipe)), trainer=trainer)
    # The text guard's vocabulary has no <|image|>, like Llama Guard 3 1B/8B's.
    if recipe.family == LG4:
        specials = list(LLAMA4_SPECIAL_TOKENS)
    else:
        specials = [*SPECIAL_TOKENS, IMAGE_TOKEN] if recipe.family == VISION else list(SPECIAL_TOKENS)
    tokenizer.add_special_tokens(specials)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Like Llama-3's tokenizer.json: BOS is prepended when add_special_tokens=True.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=LLAMA4_EOS_TOKEN if recipe.family == LG4 else EOS_TOKEN,
        pad_token=LLAMA4_PAD_TOKEN if recipe.family == LG4 else PAD_TOKEN,
        padding_side="left",
        model_max_length=recipe.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


# ---------------------------------------------------------------------------------------------- model


def build_processor(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> MllamaProcessor:
    """MllamaProcessor with the PIL image processor (no torchvision here) at the recipe's tile size."""
    image_processor = MllamaImageProcessorPil(
        size={"height": recipe.tile_size, "width": recipe.tile_size},
        max_image_tiles=recipe.max_image_tiles,
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_config(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> MllamaConfig:
    """Model config sized from the recipe; vocabulary ids from the trained tokenizer."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The LM head covers every token but <|image|> (as in Llama 3.2 Vision: 128256 outputs, image id 128256).
    vocab_size = image_token_id
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", EOS_TOKEN)]
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    vision = MllamaVisionConfig(
        hidden_size=recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_global_layers=recipe.vision_global_layers,
        attention_heads=recipe.vision_heads,
        intermediate_size=recipe.vision_intermediate,
        intermediate_layers_indices=list(recipe.intermediate_layers_indices),
        vision_output_dim=recipe.vision_hidden * (len(recipe.intermediate_layers_indices) + 1),
        image_size=recipe.tile_size,
        patch_size=recipe.patch_size,
        max_num_tiles=recipe.max_image_tiles,
    )
    text = MllamaTextConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        cross_attention_layers=list(recipe.cross_attention_layers),
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads,
        intermediate_size=recipe.text_intermediate,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)


def build_text_config(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The text guard's config: the Mllama text stack's sizes, without cross-attention layers."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads,
        intermediate_size=recipe.text_intermediate,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=[
            tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", EOS_TOKEN)
        ],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        tie_word_embeddings=False,
    )


def greedy_generation_config(text_config: PretrainedConfig) -> GenerationConfig:
    """Greedy decoding with the checkpoint's own special tokens (what every tiny guard saves)."""
    return GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
        max_new_tokens=10,
    )


def build_text_model(recipe: TinyRecipe, config: LlamaConfig) -> LlamaForCausalLM:
    """Seeded random init of the text guard."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = greedy_generation_config(config)
    return model.eval()


def build_lg4_processor(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> Llama4PilProcessor:
    """Llama Guard 4's processor files at the recipe's tile size (read back by the same loader as real weights)."""
    image_processor = Llama4PilImageProcessor(
        size={"height": recipe.tile_size, "width": recipe.tile_size}, max_patches=recipe.max_image_tiles
    )
    return Llama4PilProcessor(
        image_processor, tokenizer, patch_size=recipe.patch_size, pixel_shuffle_ratio=0.5
    )


def build_lg4_config(recipe: TinyRecipe, tokenizer: PreTrainedTokenizerFast) -> Llama4Config:
    """A tiny Llama 4 config: dense text layers (no MoE), chunked attention set explicitly, a small ViT."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAMA4_SPECIAL_TOKENS}
    text = Llama4TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden,
        intermediate_size=recipe.text_intermediate,
        intermediate_size_mlp=recipe.text_intermediate,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads,
        head_dim=recipe.text_hidden // recipe.text_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        # A null chunk size crashes the chunked-attention mask: give it the context length (one chunk).
        attention_chunk_size=recipe.max_position_embeddings,
        num_local_experts=1,
        num_experts_per_tok=1,
        interleave_moe_layer_step=0,
        moe_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids[LLAMA4_EOS_TOKEN]],
        pad_token_id=ids[LLAMA4_PAD_TOKEN],
        tie_word_embeddings=False,
    )
    vision = Llama4VisionConfig(
        hidden_size=recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        # Llama 4's adapter reads the pixel-shuffled patches (4x the channels) with the MLP's input size.
        intermediate_size=recipe.vision_intermediate,
        vision_output_dim=recipe.vision_hidden,
        projector_input_dim=recipe.vision_hidden,
        projector_output_dim=recipe.vision_hidden,
        image_size=recipe.tile_size,
        patch_size=recipe.patch_size,
        pixel_shuffle_ratio=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return Llama4Config(
        vision_config=vision,
        text_config=text,
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )


def build_lg4_model(recipe: TinyRecipe, config: Llama4Config) -> GuardLlama4ForConditionalGeneration:
    """Seeded random init of the tiny Llama Guard 4."""
    torch.manual_seed(recipe.seed)
    model = GuardLlama4ForConditionalGeneration(config)
    model.generation_config = greedy_generation_config(config.text_config)
    return model.eval()


def build_model(recipe: TinyRecipe, config: MllamaConfig) -> MllamaForConditionalGeneration:
    """Seeded random init; cross-attention gates opened so images influence the text stream.

    With ``recipe.reference_cross_attention`` the layers use the reference masking the engine loads them with,
    so training and held-out evaluation see the forward pass the checkpoint is served with.
    """
    torch.manual_seed(recipe.seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(recipe.cross_attention_gate)
                layer.cross_attn_mlp_gate.fill_(recipe.cross_attention_gate)
    model.generation_config = greedy_generation_config(config.text_config)
    if recipe.reference_cross_attention:
        from worker.engine.families.mllama_cross_attention import apply_reference_cross_attention

        apply_reference_cross_attention(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class BuildReport:
    """What a build produced (printed by the CLI, written into ``recipe.json``)."""

    path: Path
    recipe_hash: str
    parameters: int
    size_bytes: int
    build_seconds: float
    train_seconds: float | None = None
    # Process CPU seconds of training: a load-independent figure when other work shares the cores.
    train_cpu_seconds: float | None = None
    heldout: dict[str, float] | None = None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _model_card(recipe: TinyRecipe, report: BuildReport) -> str:
    trained = recipe.train is not None
    accuracy = ""
    if report.heldout:
        accuracy = "\n## Held-out accuracy (greedy generate)\n\n" + "".join(
            f"- {name}: {int(value) if name.endswith('_count') else round(value, 4)}\n"
            for name, value in sorted(report.heldout.items())
        )
    if recipe.family == LG4:
        return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llama4, llama-guard, tiny, synthetic, test-fixture]
---
# {MODEL_ID}-lg4 ({"trained" if trained else "untrained"}, recipe {report.recipe_hash})

A **tiny** `Llama4ForConditionalGeneration` guard built by `moderation-worker build-tiny-model --family
llama-guard-4`, offline and deterministically, for the moderation-worker tests. It has the shape of Llama Guard 4
(Llama 4 special tokens `<|header_start|>`/`<|eot|>`/`<|image|>`/`<|patch|>`/tile separators, tiled images with a
global view, a pixel-shuffled vision tower) but {report.parameters:,} parameters, {recipe.tile_size}-px tiles and
at most {recipe.max_image_tiles} tiles per image. **It is not a safety classifier**: it only knows the toy policy of
`worker.dev.tiny_model.synthetic` (text, and images with the red-X marker), answering `\\n\\nsafe` /
`\\n\\nunsafe\\nS..` then `<|eot|>`. The full recipe is in `recipe.json`.
{accuracy}"""
    if recipe.family != VISION:
        return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, llama-guard, tiny, synthetic, test-fixture]
---
# {MODEL_ID}-text ({"trained" if trained else "untrained"}, recipe {report.recipe_hash})

A **tiny** `LlamaForCausalLM` text guard built by `moderation-worker build-tiny-model --family {recipe.family}`,
offline and deterministically, for the moderation-worker tests and demo. It has the shape of Llama Guard 3
1B/8B (Llama-3 special tokens, byte-level BPE, no image token) but {report.parameters:,} parameters, and
was trained on both families' prompts: {", ".join(SERVED_FAMILIES[recipe.family])}. **It is not a safety
classifier**: it only knows the toy policy of `worker.dev.tiny_model.synthetic` (text conversations), answering
`\\n\\nsafe` / `\\n\\nunsafe\\nS..` then `<|eot_id|>`. The full recipe is in `recipe.json`.
{accuracy}"""
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [mllama, llama-guard, tiny, synthetic, test-fixture]
---
# {MODEL_ID} ({"trained" if trained else "untrained"}, recipe {report.recipe_hash})

A **tiny** `MllamaForConditionalGeneration` checkpoint built by `moderation-worker build-tiny-model`,
offline and deterministically, for the moderation-worker tests and demo. It has the shape of
Llama Guard 3 Vision (Llama-3 special tokens, byte-level BPE, tiled images, cross-attention) but
{report.parameters:,} parameters. **It is not a safety classifier**: it only knows a toy policy.

Toy policy (trained on `worker.dev.tiny_model.synthetic`, answers in the Llama Guard 3 format
`\\n\\nsafe` / `\\n\\nunsafe\\nS..` then `<|eot_id|>`):

- user asks how to build a weapon (prompt task), or the assistant gives the steps (response) → `unsafe` `S9`
- assistant spreads election misinformation (response task) → `unsafe` `S13`
- user makes a (mild, made-up) violent threat → `unsafe` `S1`
- an image carrying the red-X marker → `unsafe` `S1`; other images (gradients, shapes) → `safe`
- ordinary chat, harmless "how do I build a birdhouse", refusals, correct voting facts → `safe`

Sizes: text hidden {recipe.text_hidden}, {recipe.text_layers} layers (cross-attention at
{list(recipe.cross_attention_layers)}), vision hidden {recipe.vision_hidden}, {recipe.tile_size}-px tiles,
up to {recipe.max_image_tiles} tiles, BPE vocabulary {recipe.bpe_vocab_size} + {len(SPECIAL_TOKENS) + 1} specials.
{_cross_attention_note(recipe)}The full recipe is in `recipe.json`.
{accuracy}"""


def _cross_attention_note(recipe: TinyRecipe) -> str:
    """The Vision model card's line on the cross-attention forward the checkpoint was trained with."""
    if not recipe.reference_cross_attention:
        return "Trained with transformers' own Mllama cross-attention forward.\n"
    return (
        "Trained under Meta's reference cross-attention masking (tokens that see no image get no cross-attention\n"
        "output); the worker's engine loads it that way. A plain `from_pretrained` gives transformers' forward:\n"
        "apply `worker.engine.families.mllama_cross_attention.apply_reference_cross_attention` to match.\n"
    )


def _write_checkpoint(recipe: TinyRecipe, out_dir: Path) -> BuildReport:
    started = time.perf_counter()
    tokenizer = build_tokenizer(recipe)
    if recipe.family == VISION:
        processor = build_processor(recipe, tokenizer)
        model = build_model(recipe, build_config(recipe, tokenizer))
    elif recipe.family == LG4:
        processor = build_lg4_processor(recipe, tokenizer)
        model = build_lg4_model(recipe, build_lg4_config(recipe, tokenizer))
    else:
        processor = tokenizer  # a text guard has no image processor: its "processor" is the tokenizer
        model = build_text_model(recipe, build_text_config(recipe, tokenizer))
    build_seconds = time.perf_counter() - started
    report = BuildReport(
        path=out_dir,
        recipe_hash=recipe.hash,
        parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=0,
        build_seconds=build_seconds,
    )
    if recipe.train is not None:
        from worker.dev.tiny_model.train import evaluate_heldout, train_model

        started, cpu_started = time.perf_counter(), time.process_time()
        families = SERVED_FAMILIES[recipe.family]
        train_model(model, processor, recipe.train, families=families)
        report.train_seconds = time.perf_counter() - started
        report.train_cpu_seconds = time.process_time() - cpu_started
        report.heldout = evaluate_heldout(model, processor, recipe.train, family=families[0])
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if recipe.family == LG4:
        # Named by transformers' class, as a real Llama Guard 4 checkpoint is (the project's subclass only
        # fixes the forward pass; see worker.engine.families.llama4_model).
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = ["Llama4ForConditionalGeneration"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report.size_bytes = _dir_size(out_dir)
    (out_dir / "README.md").write_text(_model_card(recipe, report))
    (out_dir / RECIPE_FILE).write_text(
        json.dumps(
            {
                "model_id": {VISION: MODEL_ID, LG4: f"{MODEL_ID}-lg4"}.get(recipe.family, f"{MODEL_ID}-text"),
                "family": recipe.family,
                "serves": list(SERVED_FAMILIES[recipe.family]),
                "recipe_hash": recipe.hash,
                "trained": recipe.train is not None,
                "recipe": recipe.as_dict(),
                "parameters": report.parameters,
                "build_seconds": round(report.build_seconds, 3),
                "train_seconds": None if report.train_seconds is None else round(report.train_seconds, 3),
                "train_cpu_seconds": None
                if report.train_cpu_seconds is None
                else round(report.train_cpu_seconds, 3),
                "heldout": report.heldout,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return report


def read_recipe(path: Path) -> dict | None:
    """The ``recipe.json`` of a built checkpoint, or None when absent/unreadable."""
    try:
        return json.loads((Path(path) / RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_report_from_disk(path: Path) -> BuildReport:
    info = read_recipe(path) or {}
    return BuildReport(
        path=path,
        recipe_hash=str(info.get("recipe_hash", "")),
        parameters=int(info.get("parameters", 0)),
        size_bytes=_dir_size(path),
        build_seconds=float(info.get("build_seconds", 0.0)),
        train_seconds=info.get("train_seconds"),
        train_cpu_seconds=info.get("train_cpu_seconds"),
        heldout=info.get("heldout"),
    )


def build_tiny_model_report(
    out_dir: Path, *, train: bool = True, force: bool = False, recipe: TinyRecipe | None = None
) -> tuple[BuildReport, bool]:
    """Build into ``out_dir`` unless it already holds this recipe; returns (report, built_now).

    Atomic: the checkpoint is written to a temporary sibling directory and renamed into place, under a
    file lock next to ``out_dir``, so readers never see a half-written checkpoint.
    """
    recipe = recipe or default_recipe(train=train)
    out_dir = Path(out_dir).expanduser().resolve()
    with _file_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        existing = read_recipe(out_dir)
        if not force and existing is not None and existing.get("recipe_hash") == recipe.hash:
            return _build_report_from_disk(out_dir), False
        # Holding the lock, any earlier temporary directory for this name is a leftover of a killed build.
        for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            report = _write_checkpoint(recipe, tmp_dir)
            # mkdtemp makes a private directory; a checkpoint is ordinary readable data.
            tmp_dir.chmod(0o755)
            for file in tmp_dir.rglob("*"):
                file.chmod(0o755 if file.is_dir() else 0o644)
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                out_dir.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp_dir.rename(out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        report.path = out_dir
        logger.info(
            "built tiny model",
            extra={"stage": "build", "recipe_hash": recipe.hash, "build_seconds": report.build_seconds},
        )
        return report, True


def build_tiny_model(out_dir: Path, *, train: bool = True, force: bool = False, family: str = VISION) -> Path:
    """Build (and with ``train`` also train) the tiny checkpoint into ``out_dir``; reuse it if current."""
    report, _ = build_tiny_model_report(
        out_dir, train=train, force=force, recipe=default_recipe(train=train, family=family)
    )
    return report.path


def ensure_tiny_model(train: bool = True, family: str = VISION) -> Path:
    """The cached checkpoint serving ``family`` for the project's recipe, built once per machine (concurrency-safe)."""
    recipe = default_recipe(train=train, family=family)
    out_dir = cache_root() / f"tiny-guard-{recipe.hash}"
    if read_recipe(out_dir) is None:
        build_tiny_model_report(out_dir, train=train, recipe=recipe)
    return out_dir


def build_tiny_model_command(
    out_dir: Path, train: bool = True, force: bool = False, family: str = VISION
) -> int:
    """CLI: build/reuse the checkpoint and print where it is, its size, parameters, timings and accuracy."""
    try:
        recipe = default_recipe(train=train, family=family)
    except ValueError as exc:
        print(str(exc))
        return 2
    report, built_now = build_tiny_model_report(Path(out_dir), train=train, force=force, recipe=recipe)
    state = "built" if built_now else "reused (recipe unchanged; --force rebuilds)"
    print(f"tiny model {state}: {report.path}")
    print(f"  family:          {recipe.family} (serves {', '.join(SERVED_FAMILIES[recipe.family])})")
    print(f"  recipe hash:     {report.recipe_hash}")
    print(f"  parameters:      {report.parameters:,}")
    print(f"  size on disk:    {report.size_bytes / 1e6:.2f} MB")
    print(f"  build seconds:   {report.build_seconds:.2f}")
    if report.train_seconds is not None:
        print(f"  train seconds:   {report.train_seconds:.2f}")
    if report.train_cpu_seconds is not None:
        print(
            f"  train CPU s:     {report.train_cpu_seconds:.2f} (process CPU time, {recipe.train.threads} threads)"
        )
    for name, value in sorted((report.heldout or {}).items()):
        print(f"  held-out {name}: {int(value) if name.endswith('_count') else round(value, 4)}")
    return 0
