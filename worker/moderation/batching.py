"""Micro-batching: gather cache misses into engine batches by model, modality, size and age.

A batch is flushed when it holds ``max_size`` distinct items or when its oldest item has waited
``max_wait_s`` — whichever comes first. A batch goes to one model (the one the router chose for its
items), and text-only and image items never share a batch (the engine's rule: transformers' Mllama gives
text-only rows wrong logits in mixed batches). Items with the same
cache key join one *entry*, so identical items inside a batch are classified once.

Pure: the clock is injected, nothing here touches Kafka or the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

Modality = Literal["text", "image"]
MODALITIES: tuple[Modality, ...] = ("text", "image")

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
    """A flushed micro-batch: one model, one modality, at most ``max_size`` distinct entries."""

    modality: Modality
    entries: list[BatchEntry[T]] = field(default_factory=list)
    model: str = DEFAULT_MODEL

    @property
    def item_count(self) -> int:
        """Events carried, followers included."""
        return sum(len(e.items) for e in self.entries)


@dataclass
class _OpenBatch(Generic[T]):
    opened_at: float
    entries: dict[str, BatchEntry[T]] = field(default_factory=dict)


class MicroBatcher(Generic[T]):
    """Collects items per (model, modality) and hands out batches that are full or old enough."""

    def __init__(
        self, max_size: int, max_wait_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._open: dict[tuple[str, Modality], _OpenBatch[T]] = {}
        self._full: list[Batch[T]] = []

    def add(self, key: str, modality: Modality, item: T, *, model: str = DEFAULT_MODEL) -> bool:
        """Queue ``item`` for ``model``. Returns False when it joined a waiting entry with the same key (no new work)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}")
        group = (model, modality)
        open_batch = self._open.get(group)
        if open_batch is not None:
            entry = open_batch.entries.get(key)
            if entry is not None:
                entry.items.append(item)
                return False
        else:
            open_batch = self._open[group] = _OpenBatch(opened_at=self._clock())
        open_batch.entries[key] = BatchEntry(key, [item])
        if len(open_batch.entries) >= self.max_size:
            # Full: hand it out on the next ready() call whatever its age.
            self._full.append(Batch(modality, list(open_batch.entries.values()), model))
            del self._open[group]
        return True

    def ready(self, *, flush_all: bool = False) -> list[Batch[T]]:
        """Batches to classify now: full ones, aged ones, or everything when ``flush_all``."""
        batches, self._full = self._full, []
        now = self._clock()
        for group, open_batch in list(self._open.items()):
            if flush_all or now - open_batch.opened_at >= self.max_wait_s:
                model, modality = group
                batches.append(Batch(modality, list(open_batch.entries.values()), model))
                del self._open[group]
        return batches

    def seconds_until_due(self) -> float | None:
        """How long until the oldest open batch is due (0 if one is due or full now; None if empty)."""
        if self._full:
            return 0.0
        if not self._open:
            return None
        now = self._clock()
        return max(0.0, min(b.opened_at + self.max_wait_s - now for b in self._open.values()))

    def drop(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Remove waiting items for which ``unwanted(item)`` is true (e.g. revoked partitions); returns them."""
        dropped: list[T] = []
        for group, open_batch in list(self._open.items()):
            for key, entry in list(open_batch.entries.items()):
                kept = [i for i in entry.items if not unwanted(i)]
                dropped.extend(i for i in entry.items if unwanted(i))
                if kept:
                    entry.items = kept
                else:
                    del open_batch.entries[key]
            if not open_batch.entries:
                del self._open[group]
        for batch in self._full:
            for entry in batch.entries:
                dropped.extend(i for i in entry.items if unwanted(i))
                entry.items = [i for i in entry.items if not unwanted(i)]
            batch.entries = [e for e in batch.entries if e.items]
        self._full = [b for b in self._full if b.entries]
        return dropped

    def __len__(self) -> int:
        """Items waiting (followers included)."""
        waiting = sum(len(e.items) for b in self._open.values() for e in b.entries.values())
        return waiting + sum(b.item_count for b in self._full)
