"""Per-category scores from the scoring pass, at no extra forward pass.

The single-pass scoring pass appends the answer tail ``unsafe`` + newline + ``S`` to every row (see
``worker.engine.scoring``). The next-token distribution right after that ``S`` is the model's distribution
over the *first category code it would write, given that it answers unsafe*. For a policy with enabled codes
``C``, the score of code ``c`` is::

    category_scores[c] = P(unsafe) * p(c) / sum(p(k) for k in C)

where ``P(unsafe)`` is the verdict's ``score`` and ``p(k)`` is the softmax probability of the first token of
code ``k`` (``1`` for S1, ``13`` for S13) at that position.

What the number means: the model's probability of answering ``unsafe`` *and naming ``c`` first*. The scores
sum to ``score`` over the enabled codes; the highest one is the code greedy decoding writes first (when that
code is enabled), so it agrees with the verdict's first decoded category.

What it does not mean: it is not an independent per-category probability (Llama Guard is not a multi-label
classifier with one head per category). A conversation that violates two categories puts its mass on the one
the model would list first; the second may score low although the decoded answer names it. Use
``categories`` for what the model named and ``category_scores`` to rank and to threshold softly.

It exists only when every code's number is a single token right after ``S`` (true for the Llama 3 tokenizer,
which splits digits into groups of up to three, and for the tiny test checkpoint) and the engine runs in
``single_pass`` mode; otherwise verdicts carry no ``category_scores``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.config import CATEGORY_CODES


def code_first_tokens(plain_ids: Callable[[str], list[int]], tail: Sequence[int]) -> dict[str, int]:
    """The token that follows the tail for each code (``{"S1": id, ...}``); empty unless all are unique singles."""
    if not tail:
        return {}
    out: dict[str, int] = {}
    for code in CATEGORY_CODES:
        ids = plain_ids(f"unsafe\n{code}")
        if ids[: len(tail)] != list(tail) or len(ids) != len(tail) + 1:
            return {}
        out[code] = ids[-1]
    if len(set(out.values())) != len(out):
        return {}
    return out


def category_scores(
    score: float, code_probs: Sequence[float], codes: Sequence[str], enabled: Sequence[str]
) -> dict[str, float] | None:
    """``{code: P(unsafe) * p(code | unsafe, first)}`` over ``enabled``; ``code_probs`` aligned with ``codes``.

    None when an enabled code has no measured token (S14 of Llama Guard 3 8B / 4, custom codes): the
    normalisation over ``enabled`` would be wrong without it.
    """
    probs = dict(zip(codes, code_probs, strict=True))
    if any(c not in probs for c in enabled):
        return None
    total = sum(probs[c] for c in enabled)
    if not total > 0.0:
        return {c: 0.0 for c in enabled}
    return {c: round(score * probs[c] / total, 6) for c in enabled}
