"""Padding in a prepared batch: how many of the token positions a forward pass computes are padding.

A batch's rows are left-padded to its longest row, and the model computes every position of the padded
``input_ids`` (the attention mask only hides the pads from the other tokens). With the shared prompt start
(``model.share_prompt_prefix``) the start comes from a cache and only the rows' own rest is computed, so
only the last ``input_ids.shape[1]`` columns of the attention mask describe computed positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def padding_positions(inputs: Mapping[str, Any]) -> tuple[int, int]:
    """``(padding positions, computed positions)`` of model inputs with ``input_ids`` and ``attention_mask``.

    Computed positions are ``rows × width`` of ``input_ids``; padding is the part the mask marks 0, i.e.
    ``sum over rows of (width - row length)``. Inputs without ``input_ids`` compute nothing: ``(0, 0)``.
    """
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.numel() == 0:
        return 0, 0
    rows, width = input_ids.shape
    mask = inputs.get("attention_mask")
    real = int(mask[:, -width:].sum()) if mask is not None else rows * width
    return rows * width - real, rows * width


def batch_padding(batch: Any) -> tuple[int, int]:
    """``padding_positions`` of a prepared batch (anything with an ``inputs`` mapping; else ``(0, 0)``)."""
    inputs = getattr(batch, "inputs", None)
    return padding_positions(inputs) if isinstance(inputs, Mapping) else (0, 0)


def padding_fraction(padding: int, computed: int) -> float:
    """Padding ÷ computed positions (0.0 when nothing was computed)."""
    return padding / computed if computed else 0.0
