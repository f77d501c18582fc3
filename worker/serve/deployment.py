"""The Ray Serve deployment: ``POST /v1/moderate`` and ``/v1/moderations`` over the moderation core.

HTTP only: admission (readiness, API key, content type, body size), request parsing, tenant binding and the
response shapes live here; every moderation step — route, image bytes, cache key, cache answers, halting
blocklists, the model request, failure isolation, the verdict — is ``worker.moderation.moderator``'s, the
same code the Kafka stream runs, so both paths share cache entries and give the same verdicts.

One replica holds every configured model the routes name (``ModelRegistry``: co-located; HTTP has no
pools). Each cache miss of each request is one item of the ``@serve.batch`` method, so events of concurrent
requests share a forward pass; the batch is split by model, and by the engine's ``batches`` rule inside.
Images are decoded in the replica's own small pool under a pixel budget, never in the event loop's executor.

No ``from __future__ import annotations`` here: FastAPI (through ``serve.ingress``) must see real types.
Importing this module imports Ray Serve: import it only after ``worker.runners.ray_env`` has set the
environment (``worker.serve.app.build_app`` does). Everything the deployment class uses must be
defined above it: Serve pickles the class by value when it is decorated.
"""

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.config import Settings
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Reason, Rejection
from worker.engine.types import GuardResult
from worker.moderation.moderator import Answer, Elsewhere, Keyed, Moderator, Ready, engine_error_rejection
from worker.runners.ray_env import settings_from_payload
from worker.serve.auth import FORBIDDEN, ApiKeys, Caller, Denied
from worker.serve.http_contract import (
    NOT_READY,
    UNSUPPORTED_MEDIA_TYPE,
    PixelBudget,
    RequestError,
    error_body,
    from_http_status,
    from_rejection,
    is_json_content_type,
    parse_request,
    request_pixels_error,
)
from worker.serve.openai_compat import openai_response, openai_result, parse_moderation_request

log = logging.getLogger(__name__)

# Response header: the largest model batch this request's events were judged in (0: all from the cache).
BATCH_SIZE_HEADER = "x-mw-batch-size"
# One forward pass at a time per replica; requests arriving meanwhile fill the next batch.
MAX_CONCURRENT_BATCHES = 1


def _event_schema() -> dict[str, Any]:
    """The chat-event JSON Schema for the OpenAPI request body (the one source of truth in ``schemas/``)."""
    try:
        from worker.contracts.schemas import load_schema

        return dict(load_schema("chat_event"))
    except (ImportError, FileNotFoundError):  # documentation only: never block serving on it
        return {"type": "object"}


_EVENT_SCHEMA = _event_schema()
api = FastAPI(
    title="moderation-worker",
    version="1",
    description="Llama Guard 3 Vision moderation of OpenAI-shape chat events: the same engine, policies and "
    "verdict cache as the Kafka stream. Errors carry the dead-letter reason codes.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """404, 405 and other framework errors in the project's error shape, not FastAPI's ``{"detail": ...}``."""
    error = from_http_status(exc.status_code, str(exc.detail), request.method, request.url.path)
    status, body = error_body([error])
    headers = dict(exc.headers or {})
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(errors: list[RequestError], headers: dict[str, str] | None = None) -> Response:
    status, body = error_body(errors)
    first = errors[0]
    # One line per refused request: its reason code and field, never the content.
    log.info(
        "request rejected",
        extra={
            "stage": "http",
            "reason": str(first.reason),
            "status": status,
            "field": first.field,
            "errors": len(errors),
        },
    )
    return _json(status, body, headers)


def _denied(denied: Denied) -> Response:
    """A 401/429 from ``worker.serve.auth`` in the project's error shape (with its HTTP headers)."""
    headers = {"www-authenticate": "Bearer"} if denied.status == 401 else {}
    if denied.retry_after_s is not None:
        headers["retry-after"] = str(denied.retry_after_s)
    return _error([RequestError(denied.reason, denied.message)], headers)


def _bind_tenant(events: list[ChatEvent], caller: Caller) -> list[ChatEvent] | RequestError:
    """With an API key, every event acts for the key's tenant; an event naming another tenant is refused (403)."""
    if caller.tenant is None:
        return events
    bound = []
    for event in events:
        if event.tenant is not None and event.tenant != caller.tenant:
            return RequestError(
                FORBIDDEN, f"API key {caller.key_name!r} may not act for another tenant", "tenant"
            )
        bound.append(replace(event, tenant=caller.tenant))
    return bound


@serve.deployment(name="Moderation")
@serve.ingress(api)
class ModerationDeployment:
    """One replica: loads the engine at start; answers HTTP; batches model work across requests."""

    def __init__(self, settings: dict[str, Any] | Settings) -> None:
        from worker.cache.redis_cache import VerdictCache
        from worker.ops.logs import configure_logging
        from worker.ops.ray_export import export_to_ray

        self.settings = settings_from_payload(settings)
        configure_logging(self.settings.logging, worker="serve")
        export_to_ray(f"serve-{serve.get_replica_context().replica_id.unique_id}")
        self.models: Any = None  # the ModelRegistry, once loaded
        self.moderator: Any = None  # the moderation flow over it
        self.engine: Any = None  # its first engine; set last: it is the readiness flag
        self.load_error: str | None = None
        self.cache = VerdictCache(self.settings.redis)
        self.keys = ApiKeys(self.settings.auth, list(self.settings.tenants))
        from worker.moderation.language import warm_up

        warm_up()
        self.classify_batch.set_max_batch_size(self.settings.serve.max_batch_size)
        self.classify_batch.set_batch_wait_timeout_s(self.settings.serve.batch_wait_timeout_s)
        serve_settings = self.settings.serve
        # Image decoding runs in its own small pool, never in the loop's default executor that parses
        # requests and asks the cache: a flood of huge images queues here, not in front of small requests.
        self.decode_pool = ThreadPoolExecutor(serve_settings.decode_threads, thread_name_prefix="decode")
        self.decode_budget = PixelBudget(serve_settings.max_decoding_pixels)
        # The model loads in the background so the replica answers at once: /readyz says 503 until it is
        # loaded instead of leaving the caller waiting (the proxy queues requests for a starting replica).
        threading.Thread(target=self._load_engine, name="load-engine", daemon=True).start()

    def _load_engine(self) -> None:
        from worker.engine.registry import ModelRegistry
        from worker.ops import metrics
        from worker.ops.heap import settle_after_load

        try:
            models = ModelRegistry.from_settings(self.settings)
        except Exception as exc:  # noqa: BLE001 — reported by /readyz and the health check, not lost
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "cannot load the model: %s", exc, extra={"stage": "load", "reason": "model_load_failed"}
            )
            return
        settle_after_load()  # the models' objects leave garbage collection: no half-second pauses
        metrics.register_models(models.names)
        self.models = models
        self.moderator = Moderator(models, self.settings)
        engine = self.engine = models.first
        log.info(
            "serve replica ready",
            extra={"stage": "serve", "device": str(engine.device), "models": models.names},
        )

    def check_health(self) -> None:
        """Serve's replica health check: fails when the model could not be loaded (Serve replaces the replica)."""
        if self.load_error is not None:
            raise RuntimeError(f"model load failed: {self.load_error}")

    @api.get("/healthz", summary="Liveness: the replica answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "live"}

    @api.get("/readyz", summary="Readiness: model loaded (the cache is optional)")
    async def readyz(self) -> Response:
        ready = self.engine is not None
        body = {
            "status": "ready" if ready else ("failed" if self.load_error else "loading"),
            "model": self.engine.model_info.as_dict() if ready else None,
            "models": {n: self.models.info(n).as_dict() for n in self.models.names} if ready else {},
            "cache_available": bool(self.cache.available),
            "policies": sorted(self.engine.policies) if ready else [],
            "error": self.load_error,
        }
        return _json(200 if ready else 503, body)

    @api.get("/metrics", summary="Prometheus metrics of this replica")
    async def metrics(self) -> Response:
        from worker.ops.metrics import exposition

        return Response(exposition(), media_type="text/plain; version=0.0.4")

    @api.post(
        "/v1/moderate",
        summary="Moderate one chat event or a list of them",
        description="Body: one chat event (schemas/chat_event.v1.json) or a JSON array of them. Answer: one "
        "verdict (schemas/verdict.v1.json) or an array of verdicts in the same order. Errors: 400 unreadable "
        "JSON, 413 too large, 415 not JSON, 422 invalid event (field and reason code named), 500 engine error.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [_EVENT_SCHEMA, {"type": "array", "items": _EVENT_SCHEMA}]}
                    }
                },
            }
        },
    )
    async def moderate(self, request: Request) -> Response:
        received = time.monotonic()
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        caller, body = admitted
        parsed = await asyncio.to_thread(parse_request, body, self.settings)
        if parsed.errors:
            return _error(parsed.errors)
        events = _bind_tenant([e for e in parsed.events if e is not None], caller)
        if isinstance(events, RequestError):
            return _error([events])
        outcomes = await self._judge(events, received)
        errors = [o for o in outcomes if isinstance(o, RequestError)]
        if errors:
            return _error(errors)
        verdicts = [o[0] for o in outcomes if not isinstance(o, RequestError)]
        batch_size = max((o[1] for o in outcomes if not isinstance(o, RequestError)), default=0)
        headers = {BATCH_SIZE_HEADER: str(batch_size)}
        return _json(200, verdicts if parsed.batch else verdicts[0], headers)

    @api.post(
        "/v1/moderations",
        summary="OpenAI-compatible moderation (the openai client's moderations.create)",
        description="OpenAI's request and response shape (worker/serve/openai_compat.py documents the "
        "category mapping). Optional extras: policy, tenant (without API keys). Errors in this API's error shape.",
    )
    async def moderations(self, request: Request) -> Response:
        received = time.monotonic()
        admitted = await self._admit(request)
        if isinstance(admitted, Response):
            return admitted
        caller, body = admitted
        parsed = await asyncio.to_thread(parse_moderation_request, body, self.settings, None)
        if parsed.errors:
            return _error(parsed.errors)
        events = _bind_tenant(parsed.events, caller)
        if isinstance(events, RequestError):
            return _error([events])
        outcomes = await self._judge(events, received)
        errors = [o for o in outcomes if isinstance(o, RequestError)]
        if errors:
            return _error(errors)
        extra_map = self.settings.serve.openai_categories
        results = [
            openai_result(o[0], types, extra_map)
            for o, types in zip(outcomes, parsed.input_types, strict=True)
            if not isinstance(o, RequestError)
        ]
        return _json(200, openai_response(self.engine.model_info.id, results))

    async def _admit(self, request: Request) -> tuple[Caller, bytes] | Response:
        """What every moderation route checks first: model ready, API key, JSON content type, body size.

        Returns the caller and the body, or the error response to send.
        """
        if self.engine is None:
            why = "the model failed to load" if self.load_error else "the model is still loading"
            return _error([RequestError(NOT_READY, f"{why}; see GET /readyz")])
        caller = self.keys.check(request.headers.get("authorization"))
        if isinstance(caller, Denied):
            return _denied(caller)
        if not is_json_content_type(request.headers.get("content-type")):
            return _error([RequestError(UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")])
        body = await self._read_limited(request)
        if body is None:
            limit = self.settings.serve.max_request_bytes
            return _error([RequestError(Reason.RECORD_TOO_LARGE.value, f"request body above {limit} bytes")])
        return caller, body

    async def _read_limited(self, request: Request) -> bytes | None:
        """The body, or None as soon as it passes ``serve.max_request_bytes`` (declared or streamed)."""
        limit = self.settings.serve.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _judge(
        self, events: list[ChatEvent], received: float
    ) -> list[tuple[dict[str, Any], int] | RequestError]:
        """Verdict and model batch size per event (cache first), or the error of that event."""
        keyed = await asyncio.to_thread(self._lookup, events)
        if isinstance(keyed, RequestError):
            return [keyed] * len(events)
        found = [k for k in keyed if isinstance(k, Keyed)]
        answers = await asyncio.to_thread(self.moderator.answers, self.cache, found)
        answer_of = {id(k): a for k, a in zip(found, answers, strict=True)}
        misses = [k for k in found if answer_of[id(k)] is None]
        computed = await asyncio.gather(*(self._classify_one(k) for k in misses))
        computed_of = {id(k): c for k, c in zip(misses, computed, strict=True)}
        await asyncio.to_thread(
            self.moderator.store,
            self.cache,
            [(k, c[0]) for k, c in zip(misses, computed, strict=True) if isinstance(c[0], GuardResult)],
        )
        index = len(events) > 1
        outcomes: list[tuple[dict[str, Any], int] | RequestError] = []
        for i, item in enumerate(keyed):
            if isinstance(item, Keyed) and answer_of[id(item)] is not None:
                outcomes.append((self._verdict(item, answer_of[id(item)], received), 0))
                continue
            outcome, batch_size = computed_of[id(item)] if isinstance(item, Keyed) else (item, 0)
            if isinstance(outcome, RequestError):
                outcomes.append(
                    RequestError(outcome.reason, outcome.message, outcome.field, i if index else None)
                )
            else:
                outcomes.append((self._verdict(item, Answer(outcome, cached=False), received), batch_size))
        return outcomes

    def _lookup(self, events: list[ChatEvent]) -> list[Keyed | RequestError] | RequestError:
        """Blocking part before the cache (runs in a thread): route, image bytes, cache key; the pixel bound."""
        keyed: list[Keyed | RequestError] = []
        for event in events:
            routed = self.moderator.route(event)
            if isinstance(
                routed, Elsewhere
            ):  # only with `pool` set: Serve otherwise holds every routed model
                keyed.append(RequestError(NOT_READY, "no model of this replica judges this event"))
                continue
            item = routed if isinstance(routed, Rejection) else self.moderator.load_images(routed)
            keyed.append(from_rejection(item, None) if isinstance(item, Rejection) else item)
        return (
            request_pixels_error(
                [data for k in keyed if isinstance(k, Keyed) for data in k.images], self.settings.serve
            )
            or keyed
        )

    async def _classify_one(self, keyed: Keyed) -> tuple[GuardResult | RequestError, int]:
        """Decode the images under the replica's pixel budget, then queue the event for the next model batch."""
        loop = asyncio.get_running_loop()
        images = []
        for ref, data in zip(keyed.routed.event.images, keyed.images, strict=True):
            async with self.decode_budget.hold(data):
                image = await loop.run_in_executor(
                    self.decode_pool, partial(self.moderator.decode_image, data, ref.field_path)
                )
            if isinstance(image, Rejection):
                log.info(
                    "image rejected",
                    extra={
                        "event_id": keyed.routed.event.event_id,
                        "stage": "prepare",
                        "reason": image.reason.value,
                    },
                )
                return from_rejection(image, None), 0
            images.append(image)
        ready = await asyncio.to_thread(self.moderator.ready, keyed, tuple(images))
        return await self.classify_batch(ready)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def classify_batch(self, ready: list[Ready]) -> list[tuple[Any, int]]:
        """One model call per model for events of many requests (sizes set from ``serve.*`` at start)."""
        from worker.ops import metrics

        size = len(ready)
        for (model, modality), count in Counter(
            (r.keyed.routed.model, r.keyed.modality) for r in ready
        ).items():
            metrics.BATCH_SIZE.labels(model=model, modality=modality).observe(count)
        log.debug("serve batch", extra={"stage": "model", "batch_size": size})
        results: list[Any] = [None] * size
        for model in dict.fromkeys(r.keyed.routed.model for r in ready):
            rows = [i for i, r in enumerate(ready) if r.keyed.routed.model == model]
            with metrics.observe_stage("model"):
                part = await asyncio.to_thread(self.moderator.classify, model, [ready[i] for i in rows])
            for i, result in zip(rows, part, strict=True):
                results[i] = result
        answers: list[tuple[Any, int]] = []
        for result in results:
            if isinstance(result, GuardResult):
                answers.append((result, size))
                continue
            log.warning("engine error", extra={"stage": "model", "reason": Reason.ENGINE_ERROR.value})
            rejection = engine_error_rejection(result)
            answers.append(
                (RequestError(rejection.reason.value, f"the model failed on this event: {result}"), size)
            )
        return answers

    def _verdict(self, keyed: Keyed, answer: Answer, received: float) -> dict[str, Any]:
        from worker.ops import metrics

        verdict = self.moderator.verdict(keyed, answer, latency_ms=(time.monotonic() - received) * 1000.0)
        metrics.record_verdict(
            verdict["decision"],
            [c["code"] for c in verdict["categories"]],
            cached=answer.cached,
            model=keyed.routed.model,
        )
        return verdict
