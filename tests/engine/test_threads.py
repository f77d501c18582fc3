"""The CPU thread budget: torch gets the cores the preparation threads (or processes) leave, unless configured."""

from __future__ import annotations

import torch

from worker.config import load_settings
from worker.engine.threads import apply_thread_budget, torch_thread_budget, usable_cores


def test_torch_gets_the_cores_the_preparation_threads_leave():
    batching = load_settings(None, batching__prepare_threads=2).batching
    assert torch_thread_budget(batching, cores=2) == 1
    assert torch_thread_budget(batching, cores=16) == 14
    assert torch_thread_budget(load_settings(None, batching__prepare_threads=8).batching, cores=4) == 1


def test_with_preparation_processes_torch_gets_the_cores_the_processes_leave():
    # The preparation threads then mostly wait on the processes: the processes are what takes the cores.
    batching = load_settings(None, batching__prepare_threads=4, batching__prepare_processes=1).batching
    assert torch_thread_budget(batching, cores=2) == 1
    assert torch_thread_budget(batching, cores=8) == 7
    assert torch_thread_budget(load_settings(None, batching__prepare_processes=3).batching, cores=2) == 1


def test_a_configured_count_wins():
    batching = load_settings(None, batching__torch_threads=3).batching
    assert torch_thread_budget(batching, cores=2) == 3


def test_apply_sets_torchs_intra_op_threads():
    previous = torch.get_num_threads()
    try:
        assert apply_thread_budget(load_settings(None, batching__torch_threads=1).batching) == 1
        assert torch.get_num_threads() == 1
        expected = max(1, usable_cores() - 1)
        assert apply_thread_budget(load_settings(None, batching__prepare_threads=1).batching) == expected
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(previous)
