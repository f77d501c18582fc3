"""Micro-batching: gather cache misses into engine batches by model, modality, size, age and length.

Items wait in a *pool* per model (and per modality, unless the model's engine may mix modalities in one
forward pass). Items with the same cache key join one *entry*, so identical items inside a pool are
classified once; ``max_size`` counts distinct entries.

When batches leave:
- **Due**: when the oldest entry of a pool has waited ``max_wait_s``, the whole pool leaves, so no item ever
  waits longer than that.
- **Full**: when a pool reaches ``max_size × lookahead`` entries, one batch of ``max_size`` leaves at once.

Length-aware grouping: a forward pass computes every row to the length of its longest row, so a batch that
mixes a one-line message with a long one is mostly padding. Each entry carries a length estimate (the
``length_of`` function; the pipeline passes the conversation's characters, a cheap proxy for its tokens), and
the batcher picks batches of similar lengths out of the pool: a full pool hands out the ``max_size`` window
of the length-sorted pool that contains the oldest entry (first-come first-served still holds: the oldest
waiting entry is in the next batch of its pool) and pads least; a due pool is cut into the fewest batches,
in length order, where the cuts pad least (``least_padding_sizes``). ``lookahead = 1`` is plain arrival order (a batch leaves as soon as it
holds ``max_size`` entries); a larger lookahead lets items wait, never past ``max_wait_s``, for
similar-length company.

Modalities: by default text-only and image items never share a batch (transformers' Mllama gives
text-only rows wrong logits in mixed batches). For a model whose engine computes mixed batches exactly,
``mixes_modalities(model)`` returns True and its text-only and image items share one pool: fewer, fuller
batches.

Pure: the clock is injected, nothing here touches Kafka or the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

Modality = Literal["text", "image"]
BatchModality = Literal["text", "image", "mixed"]
MODALITIES: tuple[Modality, ...] = ("text", "image")
MIXED: BatchModality = "mixed"  # the modality of a batch holding text-only and image items

T = TypeVar("T")
DEFAULT_MODEL = "default"  # the model name of a single-model worker


@dataclass
class BatchEntry(Generic[T]):
    """One distinct item to classify and every waiting item that shares its cache key."""

    key: str
    items: list[T]

    @property
    def leader(self) -> T:
        """The item whose request goes to the engine."""
        return self.items[0]


@dataclass
class Batch(Generic[T]):
    """A flushed micro-batch: one model, at most ``max_size`` distinct entries.

    ``modality`` is ``text`` or ``image`` when every entry has it, ``mixed`` when a model that mixes
    modalities got both in one batch.
    """

    modality: BatchModality
    entries: list[BatchEntry[T]] = field(default_factory=list)
    model: str = DEFAULT_MODEL

    @property
    def item_count(self) -> int:
        """Events carried, followers included."""
        return sum(len(e.items) for e in self.entries)


@dataclass
class _Waiting(Generic[T]):
    entry: BatchEntry[T]
    modality: Modality
    arrived: float
    length: int
    seq: int  # arrival order, the tie-breaker everywhere


# A pool: (model, modality) for split models, (model, None) for a model that mixes modalities.
_PoolKey = tuple[str, Modality | None]


def padding_cost(lengths: Sequence[int]) -> int:
    """Positions a batch of rows of these lengths pads: ``sum(max - length)`` (0 for an empty batch)."""
    return len(lengths) * max(lengths) - sum(lengths) if lengths else 0


def least_padding_sizes(lengths: Sequence[int], max_size: int) -> list[int]:
    """Sizes of the fewest consecutive batches (each at most ``max_size``) of ``lengths``, sorted ascending,
    that pad least in total.

    Dynamic programming over cut points: with ``count = ceil(n / max_size)`` batches, the best cost of the
    first ``i`` rows in ``j`` batches is the best of (first ``i - s`` rows in ``j - 1`` batches) + ``s ×
    lengths[i - 1]`` over the last batch's size ``s``. Vectorised over ``i``: ``count × max_size`` array
    steps.
    """
    n = len(lengths)
    if n == 0:
        return []
    count = -(-n // max_size)
    if count == 1:
        return [n]
    row_len = np.asarray(lengths, dtype=np.float64)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    last_size: npt.NDArray[np.int64] = np.zeros((count, n + 1), dtype=np.int64)
    for j in range(count):
        step = np.full(n + 1, np.inf)
        for size in range(1, min(max_size, n) + 1):
            candidate = best[: n + 1 - size] + size * row_len[size - 1 :]
            better = candidate < step[size:]
            step[size:][better] = candidate[better]
            last_size[j, size:][better] = size
        best = step
    sizes, end = [], n
    for j in range(count - 1, -1, -1):
        sizes.append(int(last_size[j, end]))
        end -= sizes[-1]
    return sizes[::-1]


def conversation_chars(turns: Iterable[Any]) -> int:
    """Characters of a conversation's texts (turns with ``texts``): a cheap proxy for its prompt's token count."""
    return sum(len(text) for turn in turns for text in turn.texts)


def _never_mixes(model: str) -> bool:
    return False


class MicroBatcher(Generic[T]):
    """Collects items per model (and modality) and hands out batches that are due or full, similar lengths together."""

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        *,
        lookahead: int = 1,
        length_of: Callable[[T], int] | None = None,
        mixes_modalities: Callable[[str], bool] = _never_mixes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if lookahead < 1:
            raise ValueError("lookahead must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.lookahead = lookahead
        self._length_of = length_of
        self._mixes = mixes_modalities
        self._clock = clock
        self._pools: dict[_PoolKey, dict[str, _Waiting[T]]] = {}
        self._full: list[tuple[int, Batch[T]]] = []  # (seq of its oldest entry, batch) taken from full pools
        self._seq = 0

    @property
    def capacity(self) -> int:
        """Distinct entries a pool holds before a batch leaves it without waiting: ``max_size × lookahead``."""
        return self.max_size * self.lookahead

    def add(self, key: str, modality: Modality, item: T, *, model: str = DEFAULT_MODEL) -> bool:
        """Queue ``item`` for ``model``. Returns False when it joined a waiting entry with the same key (no new work)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}")
        pool_key: _PoolKey = (model, None if self._mixes(model) else modality)
        pool = self._pools.setdefault(pool_key, {})
        waiting = pool.get(key)
        if waiting is not None:
            waiting.entry.items.append(item)
            return False
        length = self._length_of(item) if self._length_of is not None else 0
        pool[key] = _Waiting(BatchEntry(key, [item]), modality, self._clock(), length, self._seq)
        self._seq += 1
        if len(pool) >= self.capacity:
            # Full: one batch leaves now, chosen from exactly this pool (not from whatever arrives before the
            # next ready() call), so lookahead 1 is exactly arrival order.
            self._full.append(self._take(pool_key, pool, self._window(list(pool.values()))))
            if not pool:
                del self._pools[pool_key]
        return True

    def ready(self, *, flush_all: bool = False) -> list[Batch[T]]:
        """Batches to classify now: from full pools, due pools, or everything when ``flush_all``.

        Batches come out in the order of their oldest entry.
        """
        out, self._full = self._full, []
        now = self._clock()
        for pool_key, pool in list(self._pools.items()):
            if flush_all or now - next(iter(pool.values())).arrived >= self.max_wait_s:
                for chunk in self._cut(list(pool.values())):
                    out.append(self._take(pool_key, pool, chunk))
            if not pool:
                del self._pools[pool_key]
        out.sort(key=lambda pair: pair[0])
        return [batch for _, batch in out]

    def _window(self, waiting: list[_Waiting[T]]) -> list[_Waiting[T]]:
        """The ``max_size`` entries, contiguous in length order, that hold the oldest entry and pad least."""
        size = self.max_size
        ordered = sorted(waiting, key=lambda w: (w.length, w.seq))
        if len(ordered) <= size:
            return ordered
        oldest = min(range(len(ordered)), key=lambda i: ordered[i].seq)
        sums = [0, *accumulate(w.length for w in ordered)]
        starts = range(max(0, oldest - size + 1), min(oldest, len(ordered) - size) + 1)
        best = min(starts, key=lambda s: size * ordered[s + size - 1].length - (sums[s + size] - sums[s]))
        return ordered[best : best + size]

    def _cut(self, waiting: list[_Waiting[T]]) -> list[list[_Waiting[T]]]:
        """The whole pool as the fewest batches, cut in length order where the padding is least."""
        ordered = sorted(waiting, key=lambda w: (w.length, w.seq))
        sizes = least_padding_sizes([w.length for w in ordered], self.max_size)
        chunks, start = [], 0
        for size in sizes:
            chunks.append(ordered[start : start + size])
            start += size
        return chunks

    def _take(
        self, pool_key: _PoolKey, pool: dict[str, _Waiting[T]], chosen: list[_Waiting[T]]
    ) -> tuple[int, Batch[T]]:
        """Remove ``chosen`` from ``pool`` as one batch (entries in arrival order), keyed by its oldest entry."""
        chosen = sorted(chosen, key=lambda w: w.seq)
        for w in chosen:
            del pool[w.entry.key]
        modalities = {w.modality for w in chosen}
        modality: BatchModality = modalities.pop() if len(modalities) == 1 else MIXED
        return chosen[0].seq, Batch(modality, [w.entry for w in chosen], pool_key[0])

    def seconds_until_due(self) -> float | None:
        """How long until a batch can leave (0 if one is due or a pool is full now; None if empty)."""
        if self._full:
            return 0.0
        if not self._pools:
            return None
        now = self._clock()
        oldest = min(next(iter(pool.values())).arrived for pool in self._pools.values())
        return max(0.0, oldest + self.max_wait_s - now)

    def drop(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Remove waiting items for which ``unwanted(item)`` is true (e.g. revoked partitions); returns them."""
        dropped: list[T] = []
        for pool_key, pool in list(self._pools.items()):
            for key, waiting in list(pool.items()):
                entry = waiting.entry
                dropped.extend(i for i in entry.items if unwanted(i))
                kept = [i for i in entry.items if not unwanted(i)]
                if kept:
                    entry.items = kept
                else:
                    del pool[key]
            if not pool:
                del self._pools[pool_key]
        for _, batch in self._full:
            for entry in batch.entries:
                dropped.extend(i for i in entry.items if unwanted(i))
                entry.items = [i for i in entry.items if not unwanted(i)]
            batch.entries = [e for e in batch.entries if e.items]
        self._full = [(seq, batch) for seq, batch in self._full if batch.entries]
        return dropped

    def __len__(self) -> int:
        """Items waiting (followers included)."""
        waiting = sum(len(w.entry.items) for pool in self._pools.values() for w in pool.values())
        return waiting + sum(batch.item_count for _, batch in self._full)
