"""The Ray Serve application: ``build_app(args)`` (Serve config import path) and ``moderation-worker serve``.

``deploy/serve_config.yaml`` names ``worker.runtime.serve_app:build_app`` with ``args``:

- ``config``: path of a worker YAML config (optional; else ``$MW_CONFIG``, else defaults), and
- ``settings``: inline overrides by section, e.g. ``{"model": {"path": "/models/guard"}, "serve": {...}}``.

``MW_*`` environment variables of the process that builds the app apply as usual; the replicas then
receive the resolved settings and do not re-read their own environment. Replica count, GPUs and
``max_ongoing_requests`` come from ``serve.*``; a Serve config's ``deployments:`` entry may still override
them (Serve's own precedence), which is how KubeRay users usually tune them.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from worker.config import ConfigError, Settings, load_settings
from worker.runtime.ray_env import init_ray, settings_payload

log = logging.getLogger(__name__)

APP_NAME = "moderation"


def settings_from_args(args: dict[str, Any] | None) -> Settings:
    """Settings from Serve ``args``: ``config`` (YAML path) then ``settings`` (inline overrides by section).

    Raises ``ConfigError`` naming the key for unknown keys or bad values.
    """
    args = dict(args or {})
    unknown = set(args) - {"config", "settings"}
    if unknown:
        raise ConfigError(f"unknown serve app args {sorted(unknown)}; known: config, settings")
    inline = args.get("settings") or {}
    if not isinstance(inline, dict):
        raise ConfigError("serve app arg 'settings' must be a mapping of config sections")
    overrides: dict[str, Any] = {}
    for section, value in inline.items():
        if isinstance(value, dict) and section not in (
            "policies",
            "tenants",
        ):  # mappings of entries, not sections
            overrides.update({f"{section}__{key}": v for key, v in value.items()})
        else:
            overrides[section] = value
    return load_settings(args.get("config"), **overrides)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve deployment options from ``serve.*``.

    ``max_ongoing_requests`` is raised to at least ``max_batch_size`` × concurrent batches: below that a
    replica can never fill a batch and Serve's default of 5 collapses throughput (ARCHITECTURE.md).
    """
    from worker.runtime.serve_deployment import MAX_CONCURRENT_BATCHES

    serve_settings = settings.serve
    floor = serve_settings.max_batch_size * MAX_CONCURRENT_BATCHES
    if serve_settings.max_ongoing_requests < floor:
        log.warning(
            "serve.max_ongoing_requests %d is below max_batch_size x concurrent batches; using %d",
            serve_settings.max_ongoing_requests,
            floor,
        )
    return {
        "num_replicas": serve_settings.num_replicas,
        "max_ongoing_requests": max(serve_settings.max_ongoing_requests, floor),
        # num_cpus=0 for GPU replicas, like the stream actors: a small node must not starve (ARCHITECTURE.md).
        "ray_actor_options": {
            "num_gpus": serve_settings.num_gpus,
            "num_cpus": 0 if serve_settings.num_gpus else 1,
        },
    }


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (``serve run`` / ``serveConfigV2`` import path ``worker.runtime.serve_app:build_app``)."""
    settings = settings_from_args(args)
    return app_for(settings)


def app_for(settings: Settings) -> Any:
    """The Serve application for already-loaded settings."""
    from worker.runtime.ray_env import prepare_ray_import

    prepare_ray_import(settings)
    from worker.runtime.serve_deployment import ModerationDeployment

    return ModerationDeployment.options(**deployment_options(settings)).bind(settings_payload(settings))


def serve_command(settings: Settings) -> int:
    """``moderation-worker serve``: run the app on ``serve.host:serve.port`` until SIGTERM/SIGINT; exit 0."""
    from worker.ops.logs import configure_logging

    configure_logging(settings.logging, worker="serve-driver")
    started_local = init_ray(settings)
    from ray import serve

    stop_requested = threading.Event()
    previous: dict[int, Any] = {}
    try:
        serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
        serve.run(app_for(settings), name=APP_NAME, route_prefix="/", blocking=False)
        # Only now: until the app runs, Ray's own SIGTERM handler (installed by ray.init) may end the process;
        # from here on a signal means "shut down cleanly".
        if threading.current_thread() is threading.main_thread():
            previous = {
                sig: signal.signal(sig, lambda *_: stop_requested.set())
                for sig in (signal.SIGTERM, signal.SIGINT)
            }
        log.info(
            "serving on http://%s:%d/v1/moderate (OpenAPI at /docs)",
            settings.serve.host,
            settings.serve.port,
            extra={"stage": "serve"},
        )
        while not stop_requested.wait(1.0):
            pass  # a timed wait lets the signal handler run promptly
        log.info("stop requested; shutting down serve", extra={"stage": "shutdown"})
    finally:
        serve.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_local:
            import ray

            ray.shutdown()
    return 0
