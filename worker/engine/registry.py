"""The guard models of one worker: each configured model loaded once, by name, with its router.

A co-located worker holds every model its routes name; a pool's worker holds its pool's models only
(``worker.moderation.routing.local_models``). The stream pipeline and the Serve deployment ask the registry which
model judges an event, then use that model's engine — one ``GuardEngine`` per model, never shared.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from worker.config import DEFAULT_MODEL_NAME, Settings
from worker.contracts.verdicts import ModelInfo
from worker.moderation.routing import Router, local_models, owns_unrouted_dead_letters

if TYPE_CHECKING:
    from worker.engine.engine import GuardEngine
    from worker.engine.policy import Policy


class ModelRegistry:
    """Engines by model name plus the router that picks one per event."""

    def __init__(self, engines: Mapping[str, GuardEngine], settings: Settings) -> None:
        if not engines:
            raise ValueError("a model registry needs at least one engine")
        self.settings = settings
        self.router = Router(settings)
        self._engines = dict(engines)
        configured = settings.guard_models()
        unknown = sorted(set(self._engines) - set(configured))
        if unknown:
            raise ValueError(f"engines {unknown} are not among the configured models {sorted(configured)}")
        self._info = {
            name: dataclasses.replace(
                engine.model_info,
                name=name,
                family=getattr(engine, "family", None) or configured[name].family,
            )
            for name, engine in self._engines.items()
        }
        self.owns_unrouted = owns_unrouted_dead_letters(settings)
        self.load_seconds = sum(getattr(e, "load_seconds", 0.0) or 0.0 for e in self._engines.values())

    @classmethod
    def from_settings(cls, settings: Settings, names: list[str] | None = None) -> ModelRegistry:
        """Load every model this worker holds (``names``, default ``local_models(settings)``), once each."""
        from worker.engine.engine import GuardEngine

        configured = settings.guard_models()
        engines: dict[str, GuardEngine] = {}
        start = time.monotonic()
        for name in names if names is not None else local_models(settings):
            one = settings.model_copy(update={"model": configured[name]})
            engines[name] = GuardEngine.from_settings(one)
        registry = cls(engines, settings)
        registry.load_seconds = time.monotonic() - start
        return registry

    @classmethod
    def of(cls, engine: GuardEngine | ModelRegistry, settings: Settings) -> ModelRegistry:
        """``engine`` as a registry: a single engine becomes the one model (named ``default``)."""
        if isinstance(engine, ModelRegistry):
            return engine
        names = list(settings.guard_models())
        return cls({names[0] if len(names) == 1 else DEFAULT_MODEL_NAME: engine}, settings)

    @property
    def names(self) -> list[str]:
        """The models held here, in configuration order."""
        return list(self._engines)

    @property
    def engines(self) -> dict[str, GuardEngine]:
        """Engines by model name."""
        return dict(self._engines)

    @property
    def first(self) -> GuardEngine:
        """The first engine (what single-model code paths use)."""
        return next(iter(self._engines.values()))

    def holds(self, name: str) -> bool:
        """Whether model ``name`` is loaded here (else another pool judges its events)."""
        return name in self._engines

    def engine(self, name: str) -> GuardEngine:
        """The engine of model ``name``."""
        return self._engines[name]

    def info(self, name: str) -> ModelInfo:
        """What verdicts report for model ``name`` (id, revision, name, family); part of the cache key."""
        return self._info[name]

    def policy_for(self, policy_id: str | None) -> Policy:
        """The policy an event names (RejectedError(UNKNOWN_POLICY) if unknown); the same for every model."""
        return self.first.policy_for(policy_id)

    def model_for(self, policy: Policy, image_count: int) -> str | None:
        """The model judging an event of ``policy`` with ``image_count`` images (None: no model can)."""
        return self.router.model_for(policy.id, image_count)
