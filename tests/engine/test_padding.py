"""Padding counted on the tensors a forward pass really computes, with and without the shared prompt start."""

from __future__ import annotations

import torch

from worker.contracts.events import Turn
from worker.engine.engine import GuardEngine
from worker.engine.padding import batch_padding, padding_fraction, padding_positions
from worker.engine.tokenize import left_pad
from worker.engine.types import GuardRequest


def test_padding_positions_of_left_padded_rows():
    input_ids, mask, _ = left_pad([[1, 2, 3, 4], [5], [6, 7]], 0)
    assert padding_positions({"input_ids": input_ids, "attention_mask": mask}) == (3 + 2, 12)
    assert padding_positions({}) == (0, 0)
    assert padding_fraction(5, 12) == 5 / 12 and padding_fraction(0, 0) == 0.0


def test_only_the_computed_columns_count_when_the_mask_covers_a_cached_start():
    # A shared start of width 2 comes from the cache: the mask is 2 columns wider than input_ids.
    input_ids = torch.ones((2, 3), dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    assert padding_positions({"input_ids": input_ids, "attention_mask": mask}) == (1, 6)


def _request(engine: GuardEngine, text: str) -> GuardRequest:
    return GuardRequest(turns=(Turn("user", (text,)),), policy=engine.policy_for(None))


def test_a_prepared_batch_pads_each_row_to_the_longest(trained_engine: GuardEngine):
    short, long_ = "hi", "tell me a long story about " + "a dragon and a knight " * 20
    for share in (False, True):
        engine = trained_engine.with_mode("single_pass", share_prefix=share)
        alone = [engine.prepare([_request(engine, t)]) for t in (short, long_)]
        assert all(batch_padding(b)[0] == 0 for b in alone)
        widths = [b.inputs["input_ids"].shape[1] for b in alone]
        mixed = engine.prepare([_request(engine, short), _request(engine, long_)])
        padding, computed = batch_padding(mixed)
        assert computed == 2 * max(widths)
        assert padding == max(widths) - min(widths) > 0
