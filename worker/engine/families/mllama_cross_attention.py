"""Mllama cross-attention as Meta's reference computes it: image-less text rows are exactly independent of images.

Meta's reference implementation (``llama-models``, ``CrossAttention.forward``) and torchtune
(``TransformerCrossAttentionLayer``) multiply the cross-attention *output* by the full-text-row mask: a token
that sees no image tile (everything before the first ``<|image|>``, every token of a text-only row) gets no
cross-attention contribution. transformers' ``MllamaCrossAttentionDecoderLayer`` masks only the MLP branch;
such a token's all-zero mask row lets it attend uniformly over every vision token and add the gated result.
That is why an image-less row changes its logits when it shares a batch with image rows, and why the few
header tokens before ``<|image|>`` depend on the image.

``apply_reference_cross_attention`` swaps the class of each cross-attention decoder layer of a loaded model
to ``ReferenceCrossAttentionDecoderLayer``: the same module (same parameters, same state-dict names), whose
forward adds the one multiplication. With it, for an image-less token a cross-attention layer returns its
input unchanged (``residual + gate * 0``), bit for bit what skipping the layer gives — the text-only path.

The subclass mirrors transformers' forward, so it is applied only where that forward is the one it was
written against: the installed ``MllamaCrossAttentionDecoderLayer.forward`` source must hash to a known
value, else loading fails with a message naming ``model.reference_cross_attention`` (review the subclass
against the new forward, or switch the patch off).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any

import torch
import transformers
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

log = logging.getLogger(__name__)

# sha256[:16] of ``inspect.getsource(MllamaCrossAttentionDecoderLayer.forward)`` per transformers release the
# subclass was checked against (a release with the same forward source is accepted too).
TESTED_FORWARDS: dict[str, str] = {"5.24.0": "6da2fb91af9d4aaa"}


class UntestedTransformersError(RuntimeError):
    """The installed transformers' Mllama cross-attention layer is not the one the patch was written for."""


class ReferenceCrossAttentionDecoderLayer(MllamaCrossAttentionDecoderLayer):
    """``MllamaCrossAttentionDecoderLayer`` with the reference's output masking (see the module docstring)."""

    def forward(  # noqa: PLR0913 — transformers' layer signature
        self,
        hidden_states: torch.Tensor,
        cross_attention_states: torch.Tensor,
        cross_attention_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        full_text_row_masked_out_mask: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Gated cross-attention and MLP; both branches are zero for rows that see no image tile."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.cross_attn(
            hidden_states=hidden_states,
            attention_mask=cross_attention_mask,
            cross_attention_states=cross_attention_states,
            cache=cache,
            **kwargs,
        )
        if full_text_row_masked_out_mask is not None:
            # The reference masks before its bias-free output projection; after it is the same.
            hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
        hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        if full_text_row_masked_out_mask is not None:
            hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
        return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


def forward_fingerprint() -> str:
    """sha256[:16] of the installed ``MllamaCrossAttentionDecoderLayer.forward`` source ("" if unreadable)."""
    try:
        source = inspect.getsource(MllamaCrossAttentionDecoderLayer.forward)
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def check_transformers() -> None:
    """UntestedTransformersError unless the installed layer forward is one the patch was checked against."""
    installed = transformers.__version__
    fingerprint = forward_fingerprint()
    if fingerprint and fingerprint in TESTED_FORWARDS.values():
        return
    tested = ", ".join(TESTED_FORWARDS)
    raise UntestedTransformersError(
        f"model.reference_cross_attention: transformers {installed}'s MllamaCrossAttentionDecoderLayer.forward "
        f"differs from the one the reference masking was written against (transformers {tested}); review "
        "worker/engine/families/mllama_cross_attention.py against it, or set model.reference_cross_attention: "
        "false"
    )


def cross_attention_layers(model: torch.nn.Module) -> list[MllamaCrossAttentionDecoderLayer]:
    """The cross-attention decoder layers of an Mllama model (any wrapper holding them as submodules)."""
    return [m for m in model.modules() if isinstance(m, MllamaCrossAttentionDecoderLayer)]


def apply_reference_cross_attention(model: torch.nn.Module) -> int:
    """Switch every cross-attention layer of ``model`` to the reference masking; returns how many were switched.

    Idempotent. Raises ``UntestedTransformersError`` (nothing switched) on an untested transformers forward.
    """
    check_transformers()
    layers = cross_attention_layers(model)
    for layer in layers:
        layer.__class__ = ReferenceCrossAttentionDecoderLayer
    return len(layers)


def remove_reference_cross_attention(model: torch.nn.Module) -> int:
    """Back to transformers' own layer forward (for comparisons); returns how many layers were switched back."""
    layers = [m for m in cross_attention_layers(model) if type(m) is ReferenceCrossAttentionDecoderLayer]
    for layer in layers:
        layer.__class__ = MllamaCrossAttentionDecoderLayer
    return len(layers)


def uses_reference_cross_attention(model: torch.nn.Module) -> bool:
    """True when ``model`` has cross-attention layers and all of them use the reference masking."""
    layers = cross_attention_layers(model)
    return bool(layers) and all(type(m) is ReferenceCrossAttentionDecoderLayer for m in layers)
