"""Prompt tokenization that keeps untrusted text plain, and left-padded batch tensors.

The rendered prompt (``worker.engine.prompt.render_segments``) already knows which pieces are control tokens
placed by the template. Each plain piece is encoded with special-token recognition switched off (a private
copy of the Rust tokenizer with ``encode_special_tokens = True``), and the template's control tokens are
inserted by id. For text without control strings the ids are exactly ``tokenizer(prompt,
add_special_tokens=False)``'s; a user typing ``<|eot_id|>`` gets the characters, never the token.

The prompt already starts with ``<|begin_of_text|>``, so no BOS is added on top (the tokenizer's post-processor
would add a second one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.engine.families import DEFAULT_FAMILY, Segment, get_family

if TYPE_CHECKING:
    import torch


_MEMO_MAX_CHARS = 64  # plain pieces up to this size are memoized; longer ones are batch-encoded


class TokenizerMismatch(ValueError):
    """The checkpoint's tokenizer lacks a token its family's template needs."""


@dataclass(frozen=True, slots=True)
class AnswerTokens:
    """Token ids of the answer's vocabulary: the first token of ``safe``/``unsafe`` and end-of-answer ids."""

    safe_id: int
    unsafe_id: int
    unsafe_ids: tuple[int, ...]  # the whole word ``unsafe`` (forced before decoding the codes)
    eos_ids: tuple[int, ...]


class PromptTokenizer:
    """Encodes rendered prompt segments into ids; thread-safe (the Rust tokenizer is used read-only)."""

    def __init__(self, tokenizer: Any, family: str = DEFAULT_FAMILY) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.family = get_family(family)
        # A private copy: flipping ``encode_special_tokens`` on the shared one would race with other callers.
        self._plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        # tokenizer.json may carry padding/truncation settings; batch-encoding prompt pieces must do neither.
        self._plain.no_padding()
        self._plain.no_truncation()
        self.special_ids: dict[str, int] = {}
        for token in self.family.special_tokens:
            token_id = self._token_id(token)
            if token_id is None:
                raise TokenizerMismatch(
                    f"the tokenizer has no {token} token; is this a {self.family.name} checkpoint?"
                )
            self.special_ids[token] = token_id
        pad = tokenizer.pad_token_id
        for name in ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>"):
            if pad is None:
                pad = self._token_id(name)
        if pad is None:
            raise TokenizerMismatch("the tokenizer has no padding token (<|finetune_right_pad_id|>)")
        self.pad_id: int = int(pad)
        image = self.family.image_token
        self.image_id: int | None = self.special_ids[image] if image else None
        self._plain_cache: dict[str, list[int]] = {}

    def _token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if (
            token_id is None
            or token_id == self.tokenizer.unk_token_id
            or self.tokenizer.convert_ids_to_tokens(token_id) != token
        ):
            return None
        return int(token_id)

    def plain_ids(self, text: str) -> list[int]:
        """Ids of ``text`` with every control-token string encoded as ordinary characters."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_many(self, prompts: Sequence[Sequence[Segment]]) -> list[list[int]]:
        """Ids of several rendered prompts; the variable plain pieces are encoded in one Rust batch call."""
        variable: list[str] = []
        for segments in prompts:
            for seg in segments:
                if not seg.special and len(seg.text) > _MEMO_MAX_CHARS:
                    variable.append(seg.text)
        encoded = {
            t: e.ids for t, e in zip(variable, self._plain.encode_batch(variable, add_special_tokens=False))
        }
        out: list[list[int]] = []
        for segments in prompts:
            ids: list[int] = []
            for seg in segments:
                if seg.special:
                    ids.append(self.special_ids[seg.text])
                elif seg.text in encoded:
                    ids.extend(encoded[seg.text])
                else:
                    ids.extend(self._short_ids(seg.text))
            out.append(ids)
        return out

    def _short_ids(self, text: str) -> list[int]:
        # The short constant pieces ("user", "\n\n", "assistant") repeat in every prompt: memoize them.
        cached = self._plain_cache.get(text)
        if cached is None:
            cached = self.plain_ids(text)
            if len(text) <= _MEMO_MAX_CHARS and len(self._plain_cache) < 1024:
                self._plain_cache[text] = cached
        return cached

    def answer_tokens(self, eos_token_id: int | Sequence[int] | None) -> AnswerTokens:
        """The answer vocabulary; ``eos_token_id`` comes from the model's generation config."""
        safe = self.plain_ids("safe")
        unsafe = self.plain_ids("unsafe")
        if not safe or not unsafe or safe[0] == unsafe[0]:
            raise TokenizerMismatch("'safe' and 'unsafe' must start with different tokens")
        eos: set[int] = {self.special_ids[self.family.end_of_turn]}
        if isinstance(eos_token_id, int):
            eos.add(eos_token_id)
        elif eos_token_id is not None:
            eos.update(int(i) for i in eos_token_id)
        end_of_text = self._token_id("<|end_of_text|>")
        if end_of_text is not None:
            eos.add(end_of_text)
        return AnswerTokens(safe[0], unsafe[0], tuple(unsafe), tuple(sorted(eos)))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for left-padded rows.

    Positions count real tokens only (``cumsum(mask) - 1``, pads at 0), as ``generate`` does, so a row's
    logits do not depend on how much padding its batch needed.
    """
    import torch

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, length - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            attention_mask[i, length - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
    return input_ids, attention_mask, position_ids
