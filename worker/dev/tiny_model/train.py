"""Teach the tiny checkpoint the toy policy: brief, seeded CPU training on synthetic conversations.

Inputs are exactly what the engine feeds the model: ``worker.engine.prompt.render_prompt`` under the default
policy of the checkpoint's family (the text guard: of each family it serves, alternating), tokenized without
adding a second BOS (the prompt carries ``<|begin_of_text|>``), images through the processor's real tiling
path, left padding, one modality per batch. A text guard (no image processor) trains on text examples only. The target is the Llama Guard 3 answer: whitespace (``\\n\\n``), then ``safe`` or ``unsafe\\nS9``,
then ``<|eot_id|>``; the loss covers the answer tokens only.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import MllamaForConditionalGeneration, MllamaProcessor

from worker.config import PolicySettings
from worker.contracts.events import Turn
from worker.dev.tiny_model.synthetic import LabelledExample, synthetic_examples
from worker.engine.families import DEFAULT_FAMILY
from worker.engine.policy import policy_from_settings
from worker.engine.prompt import render_prompt

if TYPE_CHECKING:
    from worker.dev.tiny_model.build import TrainRecipe

logger = logging.getLogger(__name__)

# What the model emits before the verdict word (Llama Guard 3 does the same).
ANSWER_PREFIX = "\n\n"
ANSWER_SUFFIX = "<|eot_id|>"
LLAMA4_ANSWER_SUFFIX = "<|eot|>"  # Llama Guard 4's end of turn
IGNORE_INDEX = -100


def example_turns(event: dict) -> tuple[Turn, ...]:
    """Turns of a synthetic event (already alternating, starting with the user, no system messages)."""
    turns = []
    for message in event["messages"]:
        content = message["content"]
        texts = (
            (content,)
            if isinstance(content, str)
            else tuple(p["text"] for p in content if p["type"] == "text")
        )
        turns.append(Turn(role=message["role"], texts=texts))
    return tuple(turns)


def example_image(event: dict) -> Image.Image | None:
    """The synthetic event's image (decoded from its PNG data URL), or None."""
    for message in event["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    payload = part["image_url"]["url"].split(",", 1)[1]
                    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
    return None


def example_prompt(example: LabelledExample, family: str = DEFAULT_FAMILY) -> str:
    """The exact prompt the engine renders for this example under ``family``'s default policy."""
    policy = policy_from_settings("default", PolicySettings(), family)
    return render_prompt(example_turns(example.event), policy, has_image=example.has_image, family=family)


def _is_llama4(processor: object) -> bool:
    return hasattr(processor, "image_processor") and hasattr(processor, "downsample_ratio")


def _encode_llama4_batch(
    processor: object, examples: Sequence[LabelledExample], *, with_targets: bool, family: str
) -> _Batch:
    """Llama Guard 4 rows the way the engine builds them: rendered segments, control tokens by id, each
    ``<|image|>`` expanded into its tiles' patch tokens; the answer ends with ``<|eot|>``."""
    from worker.engine.families.llama4_images import expand_image_ids, expansion_token_ids, patches_per_tile
    from worker.engine.prompt import render_segments
    from worker.engine.tokenize import PromptTokenizer, left_pad

    tokenizer = processor.tokenizer
    tokens = PromptTokenizer(tokenizer, family)
    policy = policy_from_settings("default", PolicySettings(), family)
    segments = [
        render_segments(example_turns(e.event), policy, has_image=e.has_image, family=family)
        for e in examples
    ]
    rows = tokens.encode_many(segments)
    inputs: dict[str, torch.Tensor] = {}
    images = [example_image(e.event) for e in examples]
    if images[0] is not None:
        out = processor.image_processor(images, return_tensors="pt")
        per_tile = patches_per_tile(
            int(out["pixel_values"].shape[-1]), processor.patch_size, processor.downsample_ratio
        )
        ids = expansion_token_ids(tokenizer)
        rows = [
            expand_image_ids(r, [ratio], per_tile, ids)
            for r, ratio in zip(rows, out["aspect_ratios"].tolist())
        ]
        inputs["pixel_values"] = out["pixel_values"].float()
    answer_ids = [
        tokenizer(ANSWER_PREFIX + e.answer + LLAMA4_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]
        if with_targets
        else []
        for e in examples
    ]
    input_ids, attention_mask, position_ids = left_pad(
        [r + a for r, a in zip(rows, answer_ids)], tokens.pad_id
    )
    inputs.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids_ in enumerate(answer_ids):
        if ids_:
            labels[row, -len(ids_) :] = torch.tensor(ids_)
    return _Batch(inputs=inputs, labels=labels)


def _reads_images(processor: object) -> bool:
    return hasattr(processor, "image_processor")


def examples_for(processor: object, examples: Sequence[LabelledExample]) -> list[LabelledExample]:
    """The examples a checkpoint can read: all of them, or the text-only ones for a text guard."""
    return list(examples) if _reads_images(processor) else [e for e in examples if not e.has_image]


@dataclass
class _Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


def _encode_batch(
    processor: MllamaProcessor,
    examples: Sequence[LabelledExample],
    *,
    with_targets: bool,
    families: Sequence[str] = (DEFAULT_FAMILY,),
    offset: int = 0,
) -> _Batch:
    """Tokenize prompts (+ answers) and images for one same-modality batch, left padded.

    Row ``i`` uses the prompt of ``families[(offset + i) % len(families)]``.
    """
    if _is_llama4(processor):
        return _encode_llama4_batch(processor, examples, with_targets=with_targets, family=families[0])
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts = [example_prompt(e, families[(offset + i) % len(families)]) for i, e in enumerate(examples)]
    answers = (
        [ANSWER_PREFIX + e.answer + ANSWER_SUFFIX for e in examples] if with_targets else [""] * len(examples)
    )
    images = [example_image(e.event) for e in examples]
    has_image = images[0] is not None
    # The answer is tokenized on its own: the prompt ends in a special token, so the split is the same as
    # tokenizing the whole string, and we know exactly which ids are answer ids.
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] if a else [] for a in answers]
    texts = [p + a for p, a in zip(prompts, answers)]
    if _reads_images(processor):
        inputs = processor(
            text=texts,
            images=[[image] for image in images] if has_image else None,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
    else:
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    for row, ids in enumerate(answer_ids):
        if ids:
            labels[row, -len(ids) :] = torch.tensor(ids)
    return _Batch(inputs=dict(inputs), labels=labels)


def _batches(examples: Sequence[LabelledExample], batch_size: int) -> Iterator[list[LabelledExample]]:
    """Same-modality batches (image and text-only rows never share one: without the reference masking, transformers' Mllama gives text-only rows in a mixed batch wrong logits)."""
    for has_image in (False, True):
        group = [e for e in examples if e.has_image == has_image]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _answer_loss(model: MllamaForConditionalGeneration, batch: _Batch) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; with left padding they are the last columns, so only the
    last few positions need logits (the LM head over every prompt position would dominate the step)."""
    answer_columns = int((batch.labels != IGNORE_INDEX).any(dim=0).sum())
    logits = model(**batch.inputs, logits_to_keep=answer_columns + 1).logits
    # Position t predicts token t+1: logits of the last (answer_columns + 1) positions, minus the final one,
    # predict the last answer_columns tokens.
    predicted = logits[:, :-1, :].float()
    targets = batch.labels[:, -answer_columns:]
    return torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class _PrefixBatch:
    """Text-only rows whose shared prompt starts (one per family and judged role in the batch) are computed
    once each, then broadcast to the rows that share them; each row computes only its own rest."""

    prefix: dict[
        str, torch.Tensor
    ]  # the distinct starts, left padded: input_ids, attention_mask, position_ids
    row_prefix: torch.Tensor  # (rows,): which start each row continues
    inputs: dict[str, torch.Tensor]  # the rests, left padded; the mask covers the row's start + its rest
    labels: torch.Tensor


def _encode_prefix_batch(
    tokenizer: object, examples: Sequence[LabelledExample], families: Sequence[str], offset: int = 0
) -> _PrefixBatch | None:
    """Text-only rows tokenized as the engine does (``PromptTokenizer``), split into shared starts and rests.

    Row ``i`` uses the prompt of ``families[(offset + i) % len(families)]`` (as ``_encode_batch``). None when a
    row's prompt does not start with its shared start's tokens (then the batch trains unshared).
    """
    from worker.engine.families.common import judged_role
    from worker.engine.prompt import render_segments, shared_text_prefix
    from worker.engine.tokenize import PromptTokenizer, left_pad

    starts: dict[tuple[str, str], list[int]] = {}
    row_keys: list[tuple[str, str]] = []
    rests: list[list[int]] = []
    answers: list[list[int]] = []
    # Building a PromptTokenizer or a policy costs milliseconds: once per family, not per row.
    per_family = {
        f: (PromptTokenizer(tokenizer, f), policy_from_settings("default", PolicySettings(), f))
        for f in dict.fromkeys(families)
    }
    for i, example in enumerate(examples):
        family = families[(offset + i) % len(families)]
        tokens, policy = per_family[family]
        turns = example_turns(example.event)
        key = (family, judged_role(turns))
        if key not in starts:
            starts[key] = tokens.encode_many([shared_text_prefix(key[1], policy, family)])[0]
        row = tokens.encode_many([render_segments(turns, policy, has_image=False, family=family)])[0]
        if row[: len(starts[key])] != starts[key]:
            return None
        suffix = LLAMA4_ANSWER_SUFFIX if tokens.family.end_of_turn == LLAMA4_ANSWER_SUFFIX else ANSWER_SUFFIX
        answer = tokenizer(ANSWER_PREFIX + example.answer + suffix, add_special_tokens=False)["input_ids"]
        row_keys.append(key)
        rests.append(row[len(starts[key]) :] + answer)
        answers.append(answer)
    keys = list(starts)
    prefix_ids, prefix_mask, prefix_positions = left_pad([starts[k] for k in keys], tokens.pad_id)
    row_prefix = torch.tensor([keys.index(k) for k in row_keys])
    input_ids, rest_mask, rest_positions = left_pad(rests, tokens.pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(answers):
        labels[row, -len(ids) :] = torch.tensor(ids)
    start_lengths = prefix_mask.sum(dim=1)[row_prefix]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.cat([prefix_mask[row_prefix], rest_mask], dim=1),
        "position_ids": rest_positions + start_lengths[:, None],
    }
    prefix = {"input_ids": prefix_ids, "attention_mask": prefix_mask, "position_ids": prefix_positions}
    return _PrefixBatch(prefix=prefix, row_prefix=row_prefix, inputs=inputs, labels=labels)


def _training_batches(
    processor: object, examples: Sequence[LabelledExample], batch_size: int, families: Sequence[str]
) -> list[_Batch | _PrefixBatch]:
    """The training batches (``_batches``' chunks, rows alternating ``families``' prompts). Text-only batches of a
    text guard or Llama Guard 4 compute each shared prompt start once (about half of every prompt's tokens);
    image batches, and every Vision batch, come as ``_encode_batch`` builds them."""
    share = not _reads_images(processor) or _is_llama4(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    out: list[_Batch | _PrefixBatch] = []
    for n, chunk in enumerate(_batches(examples, batch_size)):
        shared = (
            _encode_prefix_batch(tokenizer, chunk, families, n) if share and not chunk[0].has_image else None
        )
        out.append(
            shared
            if shared is not None
            else _encode_batch(processor, chunk, with_targets=True, families=families, offset=n)
        )
    return out


def _prefix_answer_loss(model: torch.nn.Module, batch: _PrefixBatch) -> torch.Tensor:
    """``_answer_loss`` for a shared-prefix batch: each start's keys/values are computed once (with gradient)
    and gathered for the rows that continue it; the rests attend to them exactly as to their own copy."""
    from transformers.cache_utils import DynamicCache

    start = model(**batch.prefix, use_cache=True, logits_to_keep=1)
    shared = DynamicCache(config=model.config)
    for index, layer in enumerate(start.cache.layers):
        shared.update(layer.keys[batch.row_prefix], layer.values[batch.row_prefix], index)
    answer_columns = int((batch.labels != IGNORE_INDEX).any(dim=0).sum())
    logits = model(**batch.inputs, cache=shared, logits_to_keep=answer_columns + 1).logits
    predicted = logits[:, :-1, :].float()
    targets = batch.labels[:, -answer_columns:]
    return torch.nn.functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _batch_loss(model: torch.nn.Module, batch: _Batch | _PrefixBatch) -> torch.Tensor:
    """The answer-token loss of either kind of training batch."""
    if isinstance(batch, _PrefixBatch):
        return _prefix_answer_loss(model, batch)
    return _answer_loss(model, batch)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_model(
    model: MllamaForConditionalGeneration,
    processor: MllamaProcessor,
    recipe: TrainRecipe,
    *,
    families: Sequence[str] = (DEFAULT_FAMILY,),
) -> float:
    """Train ``model`` in place on the toy policy, on the prompts of ``families`` (alternating rows);
    returns the final epoch's mean answer-token loss."""
    examples = examples_for(processor, synthetic_examples(recipe.examples, seed=recipe.seed, split="train"))
    with _torch_threads(recipe.threads):
        torch.manual_seed(recipe.seed)
        batches = _training_batches(processor, examples, recipe.batch_size, families)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
        )
        total_steps = recipe.epochs * len(batches)

        def lr_factor(step: int) -> float:
            # Linear warm-up, then cosine decay to zero: stable and quick for a short run.
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            progress = (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        generator = torch.Generator().manual_seed(recipe.seed)
        model.train()
        epoch_loss = 0.0
        for epoch in range(recipe.epochs):
            order = torch.randperm(len(batches), generator=generator).tolist()
            losses = []
            for index in order:
                batch = batches[index]
                loss = _batch_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            epoch_loss = sum(losses) / len(losses)
            logger.info(
                "tiny model training epoch", extra={"stage": "train", "epoch": epoch, "loss": epoch_loss}
            )
        model.eval()
    return epoch_loss


def parse_answer(text: str) -> tuple[str, tuple[str, ...]] | None:
    """Parse a generated Llama Guard answer into (decision, codes); None when malformed."""
    lines = text.strip().split("\n")
    if lines[0] == "safe" and len(lines) == 1:
        return "safe", ()
    if lines[0] == "unsafe" and len(lines) == 2 and lines[1]:
        return "unsafe", tuple(code.strip() for code in lines[1].split(","))
    return None


def generate_answers(
    model: MllamaForConditionalGeneration,
    processor: MllamaProcessor,
    examples: Sequence[LabelledExample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 10,
    family: str = DEFAULT_FAMILY,
) -> list[str]:
    """Greedy ``generate`` on each example (batched by modality) with ``family``'s prompt; returns the decoded
    answers in input order."""
    answers: dict[int, str] = {}
    indexed = list(enumerate(examples))
    for has_image in (False, True):
        group = [(i, e) for i, e in indexed if e.has_image == has_image]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batch = _encode_batch(processor, [e for _, e in chunk], with_targets=False, families=(family,))
            # generate derives positions from the attention mask itself.
            kwargs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
            with torch.inference_mode():
                output = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, batch.inputs["input_ids"].shape[1] :]
            tokenizer = getattr(processor, "tokenizer", processor)
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for (i, _), text in zip(chunk, decoded):
                answers[i] = text
    return [answers[i] for i in range(len(examples))]


def policy_accuracy(examples: Sequence[LabelledExample], answers: Sequence[str]) -> dict[str, float]:
    """Decision and exact-codes accuracy overall and for text-only / image examples."""
    metrics: dict[str, float] = {}
    groups = {
        "all": list(range(len(examples))),
        "text": [i for i, e in enumerate(examples) if not e.has_image],
        "image": [i for i, e in enumerate(examples) if e.has_image],
    }
    for name, indices in groups.items():
        if not indices:
            continue
        parsed = [parse_answer(answers[i]) for i in indices]
        decision_ok = sum(p is not None and p[0] == examples[i].decision for p, i in zip(parsed, indices))
        exact_ok = sum(
            p is not None and p == (examples[i].decision, examples[i].codes) for p, i in zip(parsed, indices)
        )
        metrics[f"{name}_decision_accuracy"] = decision_ok / len(indices)
        metrics[f"{name}_exact_accuracy"] = exact_ok / len(indices)
        metrics[f"{name}_count"] = float(len(indices))
    return metrics


def evaluate_heldout(
    model: MllamaForConditionalGeneration,
    processor: MllamaProcessor,
    recipe: TrainRecipe,
    *,
    family: str = DEFAULT_FAMILY,
) -> dict[str, float]:
    """Greedy-generate on the held-out split (what the checkpoint can read) and score it against the toy policy."""
    examples = examples_for(
        processor, synthetic_examples(recipe.heldout_examples, seed=recipe.heldout_seed, split="heldout")
    )
    with _torch_threads(recipe.threads):
        answers = generate_answers(model, processor, examples, family=family)
    return policy_accuracy(examples, answers)
