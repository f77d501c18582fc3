"""The moderation flow, written once: a decoded event in, a verdict (or a rejection) out.

    ChatEvent ─route─► Routed ─load_images/key─► Keyed ─answers (cache, blocklist)─► hit → verdict
                                                         └ miss ─decode_images/ready─► Ready ─classify─► verdict

The stream (``worker.stream``) and HTTP (``worker.serve``) are edges over this: they decide *when* each step
runs (threads, micro-batches, ``@serve.batch``), where its input comes from and where its output goes (Kafka
records, HTTP responses); the steps themselves — which policy and model, the image bytes, the cache key, what a
cache entry means, a halting blocklist, the model request, the failure isolation, the verdict record — live
here only. Each step returns the next typed stage or a ``Rejection`` (a dead letter on the stream, a 4xx over
HTTP); nothing is filled in later, so no stage has optional fields waiting to be set.

Plain Python: the engines come in a ``ModelRegistry``, the cache is anything with ``get_many``/``set_many``
(``worker.cache.redis_cache.VerdictCache`` in production, a dict in tests), and images are loaded through
``worker.images`` (the SSRF-guarded fetch). Blocking steps (``load_images``, ``answers``, ``decode_images``,
``classify``) are meant to run off an event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from worker.cache.entries import from_entry, to_entry
from worker.cache.keys import cache_key
from worker.contracts.dead_letters import SourceCoordinates
from worker.contracts.events import ChatEvent, Turn
from worker.contracts.rejections import Reason, RejectedError, Rejection
from worker.contracts.verdicts import VerdictTemplate, verdict_for, verdict_template
from worker.engine.isolation import classify_in_batches, run_isolated
from worker.engine.policy import resolve_event_policy
from worker.engine.types import EngineError, GuardRequest, GuardResult, halt_result
from worker.moderation.language import detect_language
from worker.moderation.routing import guard_request, images_hash
from worker.ops import metrics

if TYPE_CHECKING:
    from PIL.Image import Image

    from worker.config import LimitsSettings, Settings
    from worker.engine.blocklist import BlocklistHit
    from worker.engine.policy import Policy
    from worker.engine.registry import ModelRegistry

log = logging.getLogger(__name__)

ENGINE_ERROR_MESSAGE_CHARS = 400  # raw model output quoted in an engine_error rejection, at most
# A request every working engine answers: tells an engine outage from a batch of poison items.
PROBE_TEXT = "Hello! What is the capital of France?"
ROUTES_REMEMBERED = 4096  # routing choices kept per worker (bounded: tenant names come from events)

Modality = Literal["text", "image"]


class Cache(Protocol):
    """What the flow needs of the verdict cache (``VerdictCache``; never a dependency: errors are misses)."""

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]: ...

    def set_many(self, items: list[tuple[str, dict[str, Any]]]) -> None: ...


class Elsewhere:
    """The event is judged by a model another pool holds: no output here (see ``worker.moderation.routing``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ELSEWHERE"


ELSEWHERE = Elsewhere()


@dataclass(slots=True)  # not frozen (built per record on the hit path), never changed: see ChatEvent
class Routed:
    """An event with the policy it is judged under, the model that judges it and the blocklists it hits."""

    event: ChatEvent
    policy: Policy
    model: str
    hits: tuple[BlocklistHit, ...] = ()

    @property
    def halts(self) -> bool:
        """A halting blocklist decides this event: no model call."""
        return bool(self.hits) and self.hits[0].action == "halt"


@dataclass(slots=True)  # not frozen (built per record on the hit path), never changed: see ChatEvent
class Keyed:
    """A routed event with its images' encoded bytes (in event order) and its verdict cache key."""

    routed: Routed
    images: tuple[bytes, ...]
    key: str

    @property
    def modality(self) -> Modality:
        return "image" if self.images else "text"


@dataclass(frozen=True, slots=True)
class Ready:
    """A cache miss prepared for the model: the engine request and the language of the judged text."""

    keyed: Keyed
    request: GuardRequest
    language: dict[str, Any] | None


SHARED_ANSWERS_MAX = 4096  # cache entries whose answer is kept between reads (cleared when full)


@dataclass(frozen=True, slots=True)
class Answer:
    """A verdict's substance: the result, and whether it came from the cache (not computed now)."""

    result: GuardResult
    cached: bool


class Moderator:
    """The flow's steps for one worker's models and settings (see the module docstring)."""

    def __init__(self, models: ModelRegistry, settings: Settings) -> None:
        self.models = models
        self.settings = settings
        # Per cache entry object: (the entry, its answer); the entry is kept so its id is not reused.
        self._shared: dict[int, tuple[dict[str, Any], Answer | None]] = {}
        # Routing choices by (tenant, policy, image count): see ``route``.
        self._routes: dict[
            tuple[str | None, str | None, int], tuple[Policy, str] | Rejection | Elsewhere
        ] = {}

    # -- route ------------------------------------------------------------------------------------------------

    def route(self, event: ChatEvent) -> Routed | Rejection | Elsewhere:
        """The policy (tenants first, then the event's ``policy``) and the model for ``event``.

        A ``Rejection`` is an event no model was chosen for (unknown policy or tenant, images no model reads);
        ``ELSEWHERE`` an event whose model another pool holds. The choice depends only on the event's tenant,
        policy and image count, so it is remembered per combination (the blocklists still read every event).
        """
        where = (event.tenant, event.policy, event.image_count)
        chosen = self._routes.get(where)
        if chosen is None:
            chosen = self._choose(*where)
            if len(self._routes) >= ROUTES_REMEMBERED:  # tenants are the event's own strings: stay bounded
                self._routes.clear()
            self._routes[where] = chosen
        if not isinstance(chosen, tuple):
            return chosen
        policy, model = chosen
        hits = policy.blocklists.match(event.turns[-1].texts) if policy.blocklists else ()
        return Routed(event, policy, model, hits)

    def _choose(
        self, tenant: str | None, policy_id: str | None, image_count: int
    ) -> tuple[Policy, str] | Rejection | Elsewhere:
        first = self.models.first
        try:
            chosen_id = resolve_event_policy(
                first.policies, self.settings.tenants, tenant, policy_id, first.default_policy_id
            ).id
            policy = self.models.policy_for(chosen_id)
        except RejectedError as exc:
            return exc.rejection
        model = self.models.model_for(policy, image_count)
        if model is None:
            return Rejection(
                Reason.TOO_MANY_IMAGES, "the event has an image and no configured model reads images"
            )
        if not self.models.holds(model):
            return ELSEWHERE
        return self.models.engine(model).policy_for(chosen_id), model

    # -- images and key ---------------------------------------------------------------------------------------

    def load_images(self, routed: Routed) -> Keyed | Rejection:
        """Fetch or decode-from-URL every image's bytes (blocking; SSRF-guarded), then the cache key."""
        from worker.images.load import image_bytes

        try:
            data = tuple(image_bytes(ref, self.settings) for ref in routed.event.images)
        except RejectedError as exc:
            return exc.rejection
        except Exception as exc:  # noqa: BLE001 — one bad item must not stop the others
            log.warning(
                "image fetch raised %s",
                type(exc).__name__,
                extra={"event_id": routed.event.event_id, "stage": "prepare"},
            )
            return Rejection(
                Reason.IMAGE_FETCH_FAILED, f"the image could not be fetched ({type(exc).__name__})."
            )
        return self.key(routed, data)

    def key(self, routed: Routed, images: tuple[bytes, ...] = ()) -> Keyed:
        """The verdict cache key of ``routed`` with its images' bytes (none for a text-only event)."""
        info = self.models.info(routed.model)
        return Keyed(
            routed, images, cache_key(info, routed.policy, routed.event, images_hash(routed.event, images))
        )

    # -- cache and blocklists ---------------------------------------------------------------------------------

    def answers(self, cache: Cache, keyed: Sequence[Keyed]) -> list[Answer | None]:
        """One cache read for ``keyed``; a halting blocklist decides a miss (stored like any verdict).

        ``None``: the model must judge that item. An entry of an unexpected shape is a miss (the fresh answer
        overwrites it).
        """
        if not keyed:
            return []
        values = cache.get_many([k.key for k in keyed])
        answers: list[Answer | None] = []
        to_store: list[tuple[str, dict[str, Any]]] = []
        # One answer per distinct entry object (a cache shares equal entries, within a read and across reads):
        # a wave of repeats then builds its verdicts from one result (see ``verdict_template``).
        shared = self._shared
        if len(shared) >= SHARED_ANSWERS_MAX:
            shared.clear()
        for item, value in zip(keyed, values, strict=True):
            if value is not None:
                entry = shared.get(id(value))
                if entry is None or entry[0] is not value:
                    hit = from_entry(value)
                    entry = shared[id(value)] = (value, Answer(hit, cached=True) if hit is not None else None)
                answer = entry[1]
                if answer is not None:
                    answers.append(answer)
                    continue
            if item.routed.halts:
                halted = halt_result(item.routed.event, self.settings.model.optimized_languages)
                to_store.append((item.key, to_entry(halted)))
                answers.append(Answer(halted, cached=False))
            else:
                answers.append(None)
        if to_store:
            cache.set_many(to_store)
        return answers

    def store(self, cache: Cache, answered: Sequence[tuple[Keyed, GuardResult]]) -> None:
        """Keep fresh model answers in the cache (one pipelined write)."""
        if answered:
            cache.set_many([(keyed.key, to_entry(result)) for keyed, result in answered])

    # -- prepare ----------------------------------------------------------------------------------------------

    def decode_image(self, data: bytes, field: str | None = None) -> Image | Rejection:
        """One image's bytes as RGB pixels under ``limits`` (a pixel bomb or broken file is a rejection)."""
        return decode_image_or_rejection(data, self.settings.limits, field)

    def decode_images(self, keyed: Keyed) -> tuple[Image, ...] | Rejection:
        """Every image of ``keyed`` decoded, in order; the first that fails rejects the event."""
        return decode_event_images(keyed.routed.event, keyed.images, self.settings.limits)

    def ready(self, keyed: Keyed, images: tuple[Image, ...] = ()) -> Ready:
        """The engine request for ``keyed`` with its decoded ``images``, and the judged text's language."""
        event = keyed.routed.event
        language = detect_language(event.turns[-1].texts, self.settings.model.optimized_languages)
        return Ready(keyed, guard_request(event, keyed.routed.policy, images), language)

    # -- classify ---------------------------------------------------------------------------------------------

    def classify(
        self,
        model: str,
        ready: Sequence[Ready],
        *,
        prepared: Any = None,
        prepare_error: BaseException | None = None,
        forward: Callable[[Any], list[GuardResult | EngineError]] | None = None,
        prepare: Callable[[Sequence[GuardRequest]], Any] | None = None,
        on_batch: Callable[[Sequence[GuardRequest]], None] | None = None,
        on_split: Callable[[int, BaseException], None] | None = None,
    ) -> list[GuardResult | EngineError]:
        """``model``'s answers for ``ready``, in order, each with its item's language; failures isolated.

        Without ``prepared``, ``ready`` is split into the engine's ``batches`` (modality, size) first.
        ``prepared``/``prepare_error``/``forward``/``prepare``/``on_batch``/``on_split``: see
        ``worker.engine.isolation.run_isolated`` (the stream prepares ahead and runs on its model thread).
        """
        engine = self.models.engine(model)
        requests = [r.request for r in ready]
        if prepared is not None or prepare_error is not None:  # one batch, prepared by the caller
            results = run_isolated(
                engine,
                requests,
                prepared=prepared,
                prepare_error=prepare_error,
                forward=forward,
                prepare=prepare,
                on_batch=on_batch,
                on_split=on_split,
            )
        else:
            results = classify_in_batches(
                engine, requests, forward=forward, prepare=prepare, on_batch=on_batch, on_split=on_split
            )
        answered: list[GuardResult | EngineError] = []
        for item, result in zip(ready, results, strict=True):
            if isinstance(result, GuardResult):
                for code in result.dropped_codes:
                    metrics.ENGINE_DROPPED_CODES.labels(code=code).inc()
                result = replace(result, language=item.language)
            answered.append(result)
        return answered

    def probe(self, model: str) -> bool:
        """Whether ``model`` answers a request any working engine answers (an outage, or poison items?)."""
        engine = self.models.engine(model)
        request = GuardRequest(turns=(Turn("user", (PROBE_TEXT,)),), policy=engine.policy_for(None))
        try:
            (result,) = engine.run(engine.prepare([request]))
        except Exception as exc:  # noqa: BLE001 — a probe that raises is the answer
            log.warning("engine probe raised %s", type(exc).__name__, extra={"stage": "model"})
            return False
        return isinstance(result, GuardResult)

    # -- outcome ----------------------------------------------------------------------------------------------

    def verdict(
        self,
        keyed: Keyed,
        answer: Answer,
        *,
        latency_ms: float,
        source: SourceCoordinates | None = None,
        count: bool = True,
    ) -> dict[str, Any]:
        """The verdict record (``schemas/verdict.v1.json``) for ``keyed``; counts blocklist hits and the review band.

        Verdict counts by decision and category are left to the edge (the stream tallies them per loop turn).
        ``count=False`` leaves the blocklist and review-band counts to the caller too (``count_verdict``): a
        process whose metrics nobody scrapes hands them to one whose metrics are.
        """
        routed = keyed.routed
        verdict = verdict_for(
            routed.event,
            answer.result,
            routed.policy,
            self.models.info(routed.model),
            cached=answer.cached,
            latency_ms=latency_ms,
            hits=routed.hits,
            source=source,
        )
        if count:
            count_verdict(routed.hits, answer.result.halted, bool(verdict.get("review")))
        return verdict

    def verdict_template(self, keyed: Keyed, answer: Answer, *, source: bool) -> VerdictTemplate | None:
        """The compiled verdict of a cached ``answer`` for events shaped like ``keyed``'s (``source``: with
        source coordinates); None where the verdict is built afresh (a fresh result, or blocklist hits).

        What ``verdict`` would return, as bytes to fill in (``VerdictTemplate.render``): the cache-hit path
        encodes from it. Counts nothing: a caller counts the review band (``template.review``).
        """
        routed = keyed.routed
        if not answer.cached or routed.hits:
            return None
        event = routed.event
        return verdict_template(
            answer.result,
            routed.policy,
            self.models.info(routed.model),
            cached=True,
            created_at=event.created_at is not None,
            tenant=event.tenant is not None,
            source=source,
        )


def count_verdict(hits: tuple[BlocklistHit, ...], halted: bool, review: bool) -> None:
    """Count a verdict's blocklist hits and whether it fell in the human-review band."""
    if hits:
        metrics.record_blocklist_hits(hits, halted=halted)
    if review:
        metrics.REVIEW_BAND.inc()


def decode_image_or_rejection(
    data: bytes, limits: LimitsSettings, field: str | None = None
) -> Image | Rejection:
    """One image's bytes as RGB pixels under ``limits`` (a pixel bomb or broken file is a rejection)."""
    from worker.images.load import decode_image

    try:
        return decode_image(data, limits, field=field)
    except RejectedError as exc:
        return exc.rejection
    except Exception as exc:  # noqa: BLE001 — one bad item must not stop the others
        return Rejection(Reason.IMAGE_UNDECODABLE, f"the image could not be decoded ({type(exc).__name__}).")


def decode_event_images(
    event: ChatEvent, datas: Sequence[bytes], limits: LimitsSettings
) -> tuple[Image, ...] | Rejection:
    """Every image of ``event`` (its bytes ``datas``, in order) decoded; the first that fails rejects the event.

    Plain function: a preparation process decodes with it too (``worker.moderation.image_preparation``).
    """
    images = []
    for ref, data in zip(event.images, datas, strict=True):
        image = decode_image_or_rejection(data, limits, ref.field_path)
        if isinstance(image, Rejection):
            return image
        images.append(image)
    return tuple(images)


def engine_error_rejection(error: EngineError) -> Rejection:
    """The ``engine_error`` rejection for an item the model gave no answer for (raw output quoted, bounded)."""
    detail = str(error)
    if error.raw_output is not None:
        detail += f"; raw output: {error.raw_output[:ENGINE_ERROR_MESSAGE_CHARS]!r}"
    return Rejection(Reason.ENGINE_ERROR, detail[: ENGINE_ERROR_MESSAGE_CHARS * 2])


__all__ = [
    "ELSEWHERE",
    "Answer",
    "Cache",
    "Elsewhere",
    "Keyed",
    "Moderator",
    "Ready",
    "Routed",
    "decode_event_images",
    "decode_image_or_rejection",
    "engine_error_rejection",
]
