"""Lookup: routed events → image bytes → cache key → one cache read per turn → answered, or a miss.

The steps are the core's (``Moderator.load_images``, ``key``, ``answers``); this module decides *when* they
run on the stream: image bytes are fetched on the worker's thread pool (SSRF-guarded) so the loop never waits
on the network, an event is keyed once all its images' bytes are here (the key hashes the encoded bytes: known
before the costly decode), and one MGET answers every event keyed this turn — a hit, or a halting blocklist's
decision, is a verdict at once; the rest go to the classifier.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.cache.redis_cache import VerdictCache
from worker.contracts.rejections import Rejection
from worker.moderation.moderator import Answer, Keyed, Moderator
from worker.ops import metrics
from worker.stream.intake import Rejected
from worker.stream.items import KeyedRecord, RoutedRecord


@dataclass(slots=True)
class LookedUp:
    """One turn of lookups: answered events, misses for the classifier, events whose images failed."""

    answered: list[tuple[KeyedRecord, Answer]] = field(default_factory=list)
    misses: list[KeyedRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class Lookup:
    """Fetches image bytes off the loop thread, keys events, and asks the cache once per turn."""

    def __init__(
        self, moderator: Moderator, cache: VerdictCache, submit: Callable[..., cf.Future[Any]]
    ) -> None:
        self._moderator = moderator
        self._cache = cache
        self._submit = submit
        self._fetching: list[tuple[RoutedRecord, cf.Future[Keyed | Rejection]]] = []

    @property
    def fetching(self) -> bool:
        """Whether image bytes are still on their way."""
        return bool(self._fetching)

    def lookup(self, routed: list[RoutedRecord]) -> LookedUp:
        """Key ``routed`` (text at once, images once fetched) and look every keyed event up in one read."""
        out = LookedUp()
        keyed: list[KeyedRecord] = []
        for item in routed:
            if item.routed.event.image is None:
                keyed.append(KeyedRecord(item.record, self._moderator.key(item.routed)))
            else:
                self._fetching.append((item, self._submit(self._moderator.load_images, item.routed)))
        keyed.extend(self._collect_fetched(out))
        if not keyed:
            return out
        with metrics.observe_stage("cache"):
            answers = self._moderator.answers(self._cache, [k.keyed for k in keyed])
        for looked_up, answer in zip(keyed, answers, strict=True):
            if answer is not None:
                out.answered.append((looked_up, answer))
            else:
                out.misses.append(looked_up)
        return out

    def _collect_fetched(self, out: LookedUp) -> list[KeyedRecord]:
        """The events whose image bytes arrived (keyed); a failed fetch is a dead letter."""
        if not self._fetching:
            return []
        keyed, waiting = [], []
        for item, future in self._fetching:
            if not future.done():
                waiting.append((item, future))
                continue
            result = future.result()  # never raises: a failed fetch is a Rejection
            if isinstance(result, Rejection):
                out.rejected.append(Rejected(item.record, result, item.routed.event))
            else:
                keyed.append(KeyedRecord(item.record, result))
        self._fetching = waiting
        return keyed
