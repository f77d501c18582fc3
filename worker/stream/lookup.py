"""Lookup: routed events → image bytes → cache key → one MGET per turn → answered, or a miss for the model.

Image bytes are fetched on the worker's thread pool (SSRF-guarded, ``worker.images.load.image_bytes``) so the
loop never waits on the network; an event gets its key once all its images' bytes are here (the key hashes the
encoded bytes: known before the costly decode). One MGET answers every event keyed this turn: a hit is a
verdict at once; an event a halting blocklist decided is answered without the model (and cached like any
verdict); the rest go to the classifier.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.cache.entries import from_entry, to_entry
from worker.cache.keys import cache_key
from worker.cache.redis_cache import VerdictCache
from worker.config import Settings
from worker.contracts.dead_letters import Reason, RejectedError, Rejection
from worker.engine.registry import ModelRegistry
from worker.engine.types import GuardResult, halt_result
from worker.moderation.routing import images_hash
from worker.ops import metrics
from worker.stream.intake import Rejected
from worker.stream.items import Keyed, Routed

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Answer:
    """A verdict known without the model: from the cache (``cached``) or decided by a halting blocklist."""

    item: Keyed
    result: GuardResult
    cached: bool


@dataclass(slots=True)
class LookedUp:
    """One turn of lookups: answered events, misses for the classifier, events whose images failed."""

    answered: list[Answer] = field(default_factory=list)
    misses: list[Keyed] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class Lookup:
    """Fetches image bytes off the loop thread, keys events, and asks the cache once per turn."""

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        cache: VerdictCache,
        submit: Callable[..., cf.Future[Any]],
    ) -> None:
        self._settings = settings
        self._models = models
        self._cache = cache
        self._submit = submit
        self._fetching: list[tuple[Routed, cf.Future[tuple[bytes, ...]]]] = []

    @property
    def fetching(self) -> bool:
        """Whether image bytes are still on their way."""
        return bool(self._fetching)

    def lookup(self, routed: list[Routed]) -> LookedUp:
        """Key ``routed`` (text at once, images once fetched) and look every keyed event up in one MGET."""
        out = LookedUp()
        keyed: list[Keyed] = []
        for item in routed:
            if item.event.image is None:
                keyed.append(self._key(item, ()))
            else:
                self._fetching.append((item, self._submit(self._fetch_images, item.event.images)))
        keyed.extend(self._collect_fetched(out))
        if not keyed:
            return out
        with metrics.observe_stage("cache"):
            values = self._cache.get_many([k.cache_key for k in keyed])
        for item, value in zip(keyed, values, strict=True):
            # An entry of an unexpected shape is a miss; the fresh verdict overwrites it.
            hit = from_entry(value) if value is not None else None
            if hit is not None:
                out.answered.append(Answer(item, hit, cached=True))
            elif item.routed.hits and item.routed.hits[0].action == "halt":
                # Decided by the blocklist: no model call; cached like any verdict.
                halted = halt_result(item.routed.event, self._settings.model.optimized_languages)
                self._cache.set_many([(item.cache_key, to_entry(halted))])
                out.answered.append(Answer(item, halted, cached=False))
            else:
                out.misses.append(item)
        return out

    def _key(self, item: Routed, images: tuple[bytes, ...]) -> Keyed:
        info = self._models.info(item.model)
        return Keyed(item, images, cache_key(info, item.policy, item.event, images_hash(item.event, images)))

    def _fetch_images(self, refs: tuple[Any, ...]) -> tuple[bytes, ...]:
        from worker.images.load import image_bytes

        return tuple(image_bytes(ref, self._settings) for ref in refs)

    def _collect_fetched(self, out: LookedUp) -> list[Keyed]:
        """The events whose image bytes arrived (keyed); failed fetches become dead letters."""
        if not self._fetching:
            return []
        keyed, waiting = [], []
        for item, future in self._fetching:
            if not future.done():
                waiting.append((item, future))
                continue
            try:
                keyed.append(self._key(item, future.result()))
            except RejectedError as exc:
                out.rejected.append(Rejected(item.record, exc.rejection, item.event))
            except Exception as exc:  # noqa: BLE001 — one bad item must not stop the stream
                log.warning(
                    "image fetch raised %s",
                    type(exc).__name__,
                    extra={"event_id": item.event.event_id, "stage": "prepare"},
                )
                rejection = Rejection(
                    Reason.IMAGE_FETCH_FAILED, f"the image could not be fetched ({type(exc).__name__})."
                )
                out.rejected.append(Rejected(item.record, rejection, item.event))
        self._fetching = waiting
        return keyed
