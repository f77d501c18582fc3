"""Which guard model judges which event, and which worker pool owns which events.

The Llama Guard 3 Vision model card advises against using it on text-only conversations ("for text-only
mitigation, we recommend … Llama Guard 3-8B or Llama Guard 3-1B"), and text-only events are most of a chat
stream — so a worker holds several named models and routes each event by modality and policy:

- text-only events → a text guard (``llama-guard-3-1b`` / ``-8b``) when one is configured, else a
  ``llama-guard-4``, else the Vision model;
- events with one image → ``llama-guard-3-vision``, else ``llama-guard-4``;
- events with several images → ``llama-guard-4`` (the model itself bounds how many it reads);
- ``routing.text`` / ``.image`` / ``.multi_image`` override the rule, and ``routing.policies.<id>`` overrides
  it for the events of one policy.

Deployment shapes. *Co-located*: every worker holds every model it routes to (``pool`` unset).
*Split pools*: ``pools.<name>.models`` lists the models of each pool; a worker with ``pool: <name>`` consumes
the whole topic in its own consumer group (``<kafka.group_id>.<name>``), judges the events routed to its
models and completes the others without output — so every event gets exactly one verdict across the pools.
Records that never reach a model (undecodable input, an unknown policy, an image event no model reads)
become dead letters in exactly one pool: the one with ``dead_letters: true``, by default the pool that
judges text-only events — it reads the bulk of the stream anyway, is the cheapest to scale, and
undecodable records say nothing about images.

Pure: no model, no network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.config import DEFAULT_MODEL_NAME, RouteSettings, Settings
from worker.contracts.events import ChatEvent
from worker.engine.types import GuardRequest

if TYPE_CHECKING:
    from worker.engine.policy import Policy

TEXT_GUARDS = ("llama-guard-3-1b", "llama-guard-3-8b")
VISION = "llama-guard-3-vision"
LLAMA_GUARD_4 = "llama-guard-4"

# Images one prompt of each family can carry (None: several; the Llama Guard 4 engine sets the bound).
FAMILY_MAX_IMAGES: dict[str, int | None] = {
    "llama-guard-3-1b": 0,
    "llama-guard-3-8b": 0,
    VISION: 1,
    LLAMA_GUARD_4: None,
}


@dataclass(frozen=True, slots=True)
class Route:
    """The model names judging text-only, one-image and several-image events (None = no model can)."""

    text: str | None
    image: str | None
    multi_image: str | None

    def model_for(self, image_count: int) -> str | None:
        """The model for an event carrying ``image_count`` images."""
        if image_count <= 0:
            return self.text
        return self.image if image_count == 1 else self.multi_image


class Router:
    """Event → model name, by modality and policy (see the module docstring for the rule)."""

    def __init__(self, settings: Settings) -> None:
        self.families = {name: m.family for name, m in settings.guard_models().items()}
        self.default = self._resolve(settings.routing, None)
        self.by_policy = {
            policy_id: self._resolve(route, self.default)
            for policy_id, route in settings.routing.policies.items()
        }
        for route in (self.default, *self.by_policy.values()):
            unknown = {n for n in (route.text, route.image, route.multi_image) if n is not None} - set(
                self.families
            )
            if unknown:
                raise ValueError(
                    f"routing names models {sorted(unknown)}, not among models {sorted(self.families)}"
                )
            self._check(route)

    def _first(self, *families: str) -> str | None:
        for family in families:
            for name, fam in self.families.items():
                if fam == family:
                    return name
        return None

    def _resolve(self, route: RouteSettings, base: Route | None) -> Route:
        if base is None:
            base = Route(
                text=self._first(*TEXT_GUARDS, LLAMA_GUARD_4, VISION) or next(iter(self.families)),
                image=self._first(VISION, LLAMA_GUARD_4),
                multi_image=self._first(LLAMA_GUARD_4),
            )
        return Route(
            text=route.text or base.text,
            image=route.image or base.image,
            multi_image=route.multi_image or base.multi_image,
        )

    def _check(self, route: Route) -> None:
        for kind, name, needed in (("image", route.image, 1), ("multi_image", route.multi_image, 2)):
            if name is None:
                continue
            family = self.families[name]
            limit = FAMILY_MAX_IMAGES[family]
            if limit is not None and limit < needed:
                raise ValueError(
                    f"routing.{kind} names model {name!r} of family {family}, which reads no such images"
                )

    def route_for(self, policy_id: str) -> Route:
        """The route of ``policy_id`` (a resolved policy id)."""
        return self.by_policy.get(policy_id, self.default)

    def model_for(self, policy_id: str, image_count: int) -> str | None:
        """The model judging an event of ``policy_id`` with ``image_count`` images; None = no configured
        model reads that many images."""
        return self.route_for(policy_id).model_for(image_count)

    def routed_models(self) -> set[str]:
        """Every model some route names (the models a co-located worker must hold)."""
        routes = (self.default, *self.by_policy.values())
        return {n for r in routes for n in (r.text, r.image, r.multi_image) if n is not None}


def local_models(settings: Settings) -> list[str]:
    """The models this worker holds: its pool's, or (co-located) every model a route names."""
    if settings.pool is not None:
        return list(settings.pools[settings.pool].models)
    routed = Router(settings).routed_models()
    return [name for name in settings.guard_models() if name in routed]


def dead_letter_pool(settings: Settings) -> str | None:
    """The pool that publishes dead letters of unrouted records (None when there are no pools)."""
    if not settings.pools:
        return None
    for name, pool in settings.pools.items():
        if pool.dead_letters:
            return name
    text_model = Router(settings).default.text
    for name, pool in settings.pools.items():
        if text_model in pool.models:
            return name
    return next(iter(settings.pools))


def owns_unrouted_dead_letters(settings: Settings) -> bool:
    """Whether this worker publishes the dead letters of records no model was chosen for."""
    return settings.pool is None or dead_letter_pool(settings) == settings.pool


def consumer_group_id(settings: Settings) -> str:
    """This worker's consumer group: ``kafka.group_id``, suffixed with ``.<pool>`` in a split deployment."""
    group = settings.kafka.group_id
    return group if settings.pool is None else f"{group}.{settings.pool}"


def settings_for_pool(settings: Settings, pool: str | None) -> Settings:
    """A copy of ``settings`` for a worker of ``pool`` (None = co-located)."""
    copy = settings.model_copy(deep=True)
    copy.pool = pool  # validated on assignment
    return copy


def guard_request(event: ChatEvent, policy: Policy, images: tuple[Any, ...]) -> GuardRequest:
    """The engine request for ``event`` with its decoded ``images`` (in the order of ``event.images``).

    One image travels as ``image`` (what Llama Guard 3 Vision reads); several as ``images`` with each one's
    turn, so Llama Guard 4 writes every ``<|image|>`` in the message that carried it.
    """
    if len(images) <= 1:
        return GuardRequest(turns=event.turns, policy=policy, image=images[0] if images else None)
    return GuardRequest(
        turns=event.turns,
        policy=policy,
        images=images,
        image_turns=tuple(ref.turn_index for ref in event.images),
    )


def images_hash(event: ChatEvent, datas: tuple[bytes, ...]) -> str | None:
    """The image part of the verdict cache key: the one image's SHA-256 (unchanged for one-image events), or
    for several images one SHA-256 over each image's digest and turn, in order."""
    if not datas:
        return None
    if len(datas) == 1:
        return hashlib.sha256(datas[0]).hexdigest()
    digest = hashlib.sha256()
    for ref, data in zip(event.images, datas, strict=True):
        digest.update(f"{ref.turn_index}:{hashlib.sha256(data).hexdigest()};".encode())
    return digest.hexdigest()


__all__ = [
    "DEFAULT_MODEL_NAME",
    "FAMILY_MAX_IMAGES",
    "Route",
    "Router",
    "consumer_group_id",
    "dead_letter_pool",
    "guard_request",
    "images_hash",
    "local_models",
    "owns_unrouted_dead_letters",
    "settings_for_pool",
]
