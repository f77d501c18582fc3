"""The GPU hot path: one forward pass for P(unsafe), greedy decoding of the codes, and the generate reference.

Score. The prompt is extended with the whitespace the model always emits after the assistant header (the
*answer prefix*, ``\\n\\n`` for Llama Guard 3), so the last position's next-token distribution is the one
``generate`` samples ``safe``/``unsafe`` from. The score is P(unsafe) *normalized over the two answer words*:
``sigmoid(logit[unsafe] - logit[safe])``. Reasons: at threshold 0.5 it reproduces exactly the greedy choice
between the two words, so single-pass and generate modes agree whenever the model answers in format; it is
invariant to probability mass leaking to other tokens (which a raw softmax would silently count as "safe");
for a well-trained guard the two coincide (the mass on {safe, unsafe} is ~1). The raw mass on the two words is
returned alongside for monitoring.

Codes, without a second pass over the prompt. The answer of an unsafe row always begins ``unsafe`` + newline
+ ``S``; those *format tokens* (the "answer tail") are appended to every row of the scoring pass. Causal
attention keeps the score position blind to them, and the same pass then also shows, for each row, whether
the model would itself have emitted the tail after ``unsafe`` (greedy check at each tail position) and the
first token of the first code. Only rows at or above their policy's threshold are decoded further: they are
selected from the pass's KV cache (``DynamicCache.batch_select_indices``) and decoded greedily together, one
model call per token (never per row), until every row has ended its answer or the budget is spent — usually
one or two calls (``9`` then the end token). This is exact greedy decoding after a forced ``unsafe``: a row
whose model would not have written the tail is re-decoded from its prompt the plain way (never happens for a
guard that answers in format, but a malformed answer must still be reported as it is). An answer without an
end token is reported as truncated, never parsed: ``S1`` cut from ``S13`` must not pass as S1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.engine.tokenize import AnswerTokens


@dataclass(slots=True)
class ScoreOutput:
    """Per-row results of the scoring pass (CPU tensors) and its KV cache."""

    scores: torch.Tensor  # float32 [B]: P(unsafe), normalized over {safe, unsafe}
    answer_mass: torch.Tensor  # float32 [B]: raw softmax mass on {safe, unsafe}
    tail_ok: torch.Tensor  # bool [B]: the model itself continues ``unsafe`` with the answer tail
    next_ids: torch.Tensor  # long [B]: greedy token after the tail (first token of the first code)
    cache: Any  # transformers Cache or None
    code_probs: torch.Tensor | None = None  # float32 [B, len(code_ids)]: softmax after the tail at code_ids


def to_device(
    inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Move a prepared batch to the model's device; pixel values take the model's dtype."""
    non_blocking = device.type == "cuda"
    moved = {}
    for name, tensor in inputs.items():
        if name == "pixel_values":
            moved[name] = tensor.to(device=device, dtype=dtype, non_blocking=non_blocking)
        else:
            moved[name] = tensor.to(device=device, non_blocking=non_blocking)
    return moved


def model_kwargs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward-pass arguments of a prepared batch (text-only batches carry no image tensors; a mixed Mllama
    batch carries the image rows' ``cross_attention_states`` instead of tiles)."""
    keys = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "aspect_ratio_ids",
        "aspect_ratio_mask",
        "cross_attention_mask",
        "cross_attention_states",
    )
    return {k: inputs[k] for k in keys if k in inputs}


def drop_tail(
    inputs: dict[str, torch.Tensor], tail_length: int, rows: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The batch without its last ``tail_length`` tokens (left padding puts the tail last in every row)."""
    out = {}
    for name, tensor in inputs.items():
        if rows is not None:
            tensor = tensor.index_select(0, rows)
        if name in ("input_ids", "attention_mask", "position_ids", "cross_attention_mask") and tail_length:
            tensor = tensor[:, :-tail_length]
        out[name] = tensor
    return out


def answer_probabilities(
    answer_logits: torch.Tensor, answer: AnswerTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(unsafe) normalized over {safe, unsafe}, raw softmax mass on {safe, unsafe}) from ``[B, V]`` logits."""
    logits = answer_logits.float()
    pair = logits[:, [answer.safe_id, answer.unsafe_id]]
    scores = torch.sigmoid(pair[:, 1] - pair[:, 0])
    mass = torch.exp(pair - torch.logsumexp(logits, dim=-1, keepdim=True)).sum(-1)
    return scores, mass


def score(
    model: Any,
    inputs: dict[str, torch.Tensor],
    answer: AnswerTokens,
    tail: Sequence[int],
    *,
    keep_cache: bool,
    cache: Any = None,
    code_ids: Sequence[int] = (),
) -> ScoreOutput:
    """One forward pass over prompt + answer prefix + answer ``tail``; logits only at the last len(tail)+1 positions.

    ``tail`` is what was appended after the prefix (``unsafe``, newline, ``S``), possibly empty. ``cache``
    holds the keys/values of a shared prompt start when ``inputs`` carry only the rest (see ``GuardEngine``).
    ``code_ids``: tokens whose probability right after the whole tail is returned (``code_probs``): the first
    token of each category code, when the tail ends with ``S``.
    """
    kept = len(tail) + 1
    extra = {"cache": cache} if cache is not None else {}  # transformers 5: `cache`, not `past_key_values`
    out = model(
        **model_kwargs(inputs), use_cache=keep_cache or cache is not None, logits_to_keep=kept, **extra
    )
    logits = out.logits  # [B, kept, V]
    scores, mass = answer_probabilities(logits[:, 0, :], answer)
    greedy = logits[:, 1:, :].argmax(-1)  # what the model writes after each tail token
    if len(tail) > 1:
        expected = torch.as_tensor(list(tail[1:]), device=greedy.device)
        tail_ok = (greedy[:, :-1] == expected).all(dim=1)
    else:
        tail_ok = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    next_ids = greedy[:, -1] if len(tail) else logits[:, 0, :].argmax(-1)
    code_probs = None
    if code_ids and len(tail):
        last = logits[:, -1, :].float()
        index = torch.as_tensor(list(code_ids), device=last.device)
        code_probs = torch.softmax(last, dim=-1).index_select(1, index).cpu()
    return ScoreOutput(
        scores.cpu(),
        mass.cpu(),
        tail_ok.cpu(),
        next_ids,
        out.cache if keep_cache else None,
        code_probs,
    )


def decode_greedy(
    model: Any,
    inputs: dict[str, torch.Tensor],
    cache: Any,
    rows: Sequence[int],
    answer: AnswerTokens,
    pad_id: int,
    max_new_tokens: int,
    *,
    feed: Sequence[int] = (),
    first_ids: torch.Tensor | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuation of ``rows`` of a batch whose sequence (``inputs``) is already in ``cache``.

    Either ``feed`` (ids forced for every row, e.g. ``unsafe``) is fed first, or ``first_ids`` (the already
    known next token of each selected row) is recorded and fed. Returns per row the generated ids (end token
    excluded, ``first_ids`` included) and whether the answer ended within ``max_new_tokens``. The cache is
    consumed (rows not in ``rows`` are dropped from it). One model call per token for all rows together.
    """
    device = inputs["input_ids"].device
    index = torch.as_tensor(list(rows), dtype=torch.long, device=device)
    if len(rows) != inputs["input_ids"].shape[0]:
        cache.batch_select_indices(index)
    attention_mask = inputs["attention_mask"].index_select(0, index)
    last_position = inputs["position_ids"].index_select(0, index)[:, -1:]
    cross_mask = inputs.get("cross_attention_mask")
    if cross_mask is not None:
        cross_mask = cross_mask.index_select(0, index)[
            :, -1:
        ]  # generated tokens see the image like the last one

    n = len(rows)
    eos = torch.as_tensor(answer.eos_ids, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    if first_ids is not None:
        step_ids = first_ids.to(device)[:, None]
        generated.append(step_ids[:, 0])
        finished |= torch.isin(step_ids[:, 0], eos)
    else:
        step_ids = torch.as_tensor(list(feed), dtype=torch.long, device=device).expand(n, -1)
    while len(generated) < max_new_tokens and not bool(finished.all()):
        width = step_ids.shape[1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((n, width))], dim=1)
        positions = last_position + torch.arange(1, width + 1, device=device)
        last_position = positions[:, -1:]
        kwargs: dict[str, Any] = {}
        if cross_mask is not None:
            kwargs["cross_attention_mask"] = cross_mask.expand(-1, width, -1, -1)
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        cache = out.cache
        next_ids = out.logits[:, -1, :].argmax(-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, eos)
        step_ids = next_ids[:, None]
    if not generated:
        return [[] for _ in rows], [False] * n
    return _split_at_eos(torch.stack(generated, dim=1).cpu(), answer.eos_ids)


def _split_at_eos(tokens: torch.Tensor, eos_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    out: list[list[int]] = []
    ended: list[bool] = []
    eos = set(eos_ids)
    for row in tokens.tolist():
        for i, tok in enumerate(row):
            if tok in eos:
                out.append(row[:i])
                ended.append(True)
                break
        else:
            out.append(row)
            ended.append(False)
    return out, ended


@dataclass(slots=True)
class GenerateOutput:
    """The reference mode's answers: generated ids (end excluded), whether each ended, and the logits per step."""

    tokens: list[list[int]]
    ended: list[bool]
    step_logits: torch.Tensor  # float32 [steps, B, 2] logits of (safe, unsafe) at each generated step, CPU
    step_mass: torch.Tensor  # float32 [steps, B] softmax mass on {safe, unsafe}, CPU


def generate(
    model: Any, inputs: dict[str, torch.Tensor], answer: AnswerTokens, pad_id: int, max_new_tokens: int
) -> GenerateOutput:
    """Plain greedy ``generate`` of the whole answer (as the model card does): the reference mode."""
    kwargs = model_kwargs(inputs)
    kwargs.pop("position_ids", None)  # generate derives them from the attention mask, the same way
    prompt_length = kwargs["input_ids"].shape[1]
    out = model.generate(
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=list(answer.eos_ids),
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, prompt_length:].cpu()
    logits = torch.stack([step.float() for step in out.logits], dim=0)  # [steps, B, V]
    pair = logits[:, :, [answer.safe_id, answer.unsafe_id]]
    mass = torch.exp(pair - torch.logsumexp(logits, dim=-1, keepdim=True)).sum(-1)
    tokens, ended = _split_at_eos(new_tokens, answer.eos_ids)
    return GenerateOutput(tokens, ended, pair.cpu(), mass.cpu())
