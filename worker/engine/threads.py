"""The CPU thread budget of a worker process: torch's intra-op threads next to the preparation threads.

Image preparation (``batching.prepare_threads``: decode, tiling, tokenization) runs on threads of the same
process while the model runs (or in ``batching.prepare_processes`` processes beside it), so both draw on the
same cores. torch's default intra-op pool takes every
core; with the preparation threads busy too, the cores are oversubscribed and each of the model's parallel
ops waits for its slowest thread to be scheduled. The budget gives torch the cores the preparation threads
leave (at least one) unless ``batching.torch_threads`` says otherwise.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.config import BatchingSettings

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_thread_budget(batching: BatchingSettings, cores: int | None = None) -> int:
    """torch's intra-op threads: ``batching.torch_threads``, else the cores left by the preparation threads or
    processes (≥ 1)."""
    if batching.torch_threads is not None:
        return batching.torch_threads
    # With preparation processes the prepare threads mostly wait on them: the processes take the cores.
    preparing = batching.prepare_processes or batching.prepare_threads
    return max(1, (cores if cores is not None else usable_cores()) - preparing)


def apply_thread_budget(batching: BatchingSettings) -> int:
    """Set torch's intra-op thread count to the budget (process-wide); returns it."""
    import torch

    threads = torch_thread_budget(batching)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info(
            "torch intra-op threads set",
            extra={"stage": "load", "torch_threads": threads, "prepare_threads": batching.prepare_threads},
        )
    return threads
