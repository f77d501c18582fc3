"""The Ray Serve application: ``build_app(args)`` (Serve config import path) and ``moderation-worker serve``.

``deploy/serve_config.yaml`` names ``worker.serve.app:build_app`` with ``args``:

- ``config``: path of a worker YAML config (optional; else ``$MW_CONFIG``, else defaults), and
- ``settings``: inline overrides by section, e.g. ``{"model": {"path": "/models/guard"}, "serve": {...}}``.

``MW_*`` environment variables of the process that builds the app apply as usual; the replicas then
receive the resolved settings and do not re-read their own environment. Replica count, GPUs and
``max_ongoing_requests`` come from ``serve.*``; a Serve config's ``deployments:`` entry may still override
them (Serve's own precedence), which is how KubeRay users usually tune them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from worker.config import ConfigError, Settings, load_settings
from worker.runners.ray_env import init_ray, settings_payload
from worker.runners.signals import stop_on_signals

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
        # Maps of entries are set whole, not as sections.
        if isinstance(value, dict) and section not in ("policies", "models", "pools", "tenants"):
            overrides.update({f"{section}__{key}": v for key, v in value.items()})
        else:
            overrides[section] = value
    return load_settings(args.get("config"), **overrides)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve deployment options from ``serve.*``.

    ``max_ongoing_requests`` is raised to at least ``max_batch_size`` × concurrent batches: below that a
    replica can never fill a batch and Serve's default of 5 collapses throughput (a replica holding at most
    5 requests never runs a batch of more than 5 events).
    """
    from worker.serve.deployment import MAX_CONCURRENT_BATCHES

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
        # On stop, a replica finishes its in-flight requests (checked every half second) before it goes.
        "graceful_shutdown_timeout_s": serve_settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        # Serve's own access/replica lines as JSON too (our records already are).
        **({"logging_config": {"encoding": "JSON"}} if settings.logging.format == "json" else {}),
        # num_cpus=0 for GPU replicas, like the stream actors: a GPU node's few CPUs must not leave a replica
        # waiting for a CPU slot it never uses.
        "ray_actor_options": {
            "num_gpus": serve_settings.num_gpus,
            "num_cpus": 0 if serve_settings.num_gpus else 1,
        },
    }


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (``serve run`` / ``serveConfigV2`` import path ``worker.serve.app:build_app``)."""
    settings = settings_from_args(args)
    return app_for(settings)


def app_for(settings: Settings) -> Any:
    """The Serve application for already-loaded settings."""
    from worker.runners.ray_env import prepare_ray_import

    prepare_ray_import(settings)
    from worker.serve.deployment import ModerationDeployment

    return ModerationDeployment.options(**deployment_options(settings)).bind(settings_payload(settings))


def serve_command(settings: Settings) -> int:
    """``moderation-worker serve``: run the app on ``serve.host:serve.port`` until SIGTERM/SIGINT.

    Start-up: Ray, Serve's proxy, then the app; the replica loads the model in the background, answering
    ``/readyz`` with 503 meanwhile. A signal at any moment leads to the same ordered stop: the app is
    deleted (each replica finishes its in-flight requests, up to ``serve.drain_timeout_s``), then Serve,
    then Ray. Exit status 0 after a signal, 1 when the app cannot start or its model cannot be loaded.
    """
    from worker.ops.logs import configure_logging
    from worker.ops.preflight import check_redis

    configure_logging(settings.logging, worker="serve-driver")
    check_redis(settings)  # optional: one warning saying replicas run uncached, never a stop
    # Serve's proxy waits at least this long before it stops after a drain request (default 30 s, which
    # outlasts Serve's own 30 s controller shutdown timeout and ends in ray.kill). Read by the proxy when
    # Ray starts it, so it must be in the environment before ray.init; an operator's value wins.
    os.environ.setdefault("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", str(PROXY_DRAIN_PERIOD_S))
    try:
        started_local = init_ray(settings)
    except Exception as exc:  # noqa: BLE001 — infrastructure fault at start: one line, not Ray's traceback
        log.error("cannot start or join ray: %s", _first_line(exc), extra={"stage": "ray_init"})
        return 1
    from ray import serve

    stop_requested = threading.Event()
    status = 0
    # From here on a signal means "stop in order", even during start-up (it replaces Ray's own handler).
    with stop_on_signals(stop_requested.set):
        try:
            json_logs = {"logging_config": {"encoding": "JSON"}} if settings.logging.format == "json" else {}
            serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port}, **json_logs)
            status = _deploy_and_wait(settings, stop_requested)
            if status == 0:
                while not stop_requested.wait(1.0):
                    pass  # a timed wait lets the signal handler run promptly
                log.info("stop requested; draining in-flight requests", extra={"stage": "shutdown"})
        finally:
            _stop_in_order(settings, started_local)
    return status


PROXY_DRAIN_PERIOD_S = 1.0
READY_POLL_S = 1.0


def _deploy_and_wait(settings: Settings, stop_requested: threading.Event) -> int:
    """Deploy the app (in a thread, so a signal is noticed meanwhile) and wait until ``/readyz`` says ready.

    Returns 0 when serving (or stopped by a signal during start-up), 1 when the app or its model failed.
    """
    from ray import serve

    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app_for(settings), name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as exc:  # noqa: BLE001 — reported below as one line
            failure.append(exc)

    thread = threading.Thread(target=deploy, name="serve-deploy", daemon=True)
    thread.start()
    while thread.is_alive() and not stop_requested.wait(0.2):
        pass
    if failure:
        log.error("cannot start the serve application: %s", _first_line(failure[0]), extra={"stage": "serve"})
        return 1
    while not stop_requested.is_set():
        state, detail = _readiness(settings)
        if state == "ready":
            log.info(
                "serving on http://%s:%d/v1/moderate (OpenAPI at /docs)",
                settings.serve.host,
                settings.serve.port,
                extra={"stage": "serve"},
            )
            return 0
        if state == "failed":
            log.error(
                "cannot load the model: %s", detail, extra={"stage": "load", "reason": "model_load_failed"}
            )
            return 1
        stop_requested.wait(READY_POLL_S)
    return 0


def _readiness(settings: Settings) -> tuple[str, str]:
    """``(status, detail)`` from the app's own ``/readyz``: ``ready``, ``loading``, ``failed`` or ``unknown``."""
    import urllib.error
    import urllib.request

    host = settings.serve.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.serve.port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError:
        return "unknown", ""
    try:
        import orjson

        answer = orjson.loads(body)
    except ValueError:
        return "unknown", ""
    return str(answer.get("status", "unknown")), str(answer.get("error") or "")


def _stop_in_order(settings: Settings, started_local: bool) -> None:
    """Delete the app (replicas drain), stop Serve, then Ray; each step logged, none skipped on failure."""
    from ray import serve

    steps = [
        ("draining and deleting the application", lambda: serve.delete(APP_NAME)),
        ("stopping serve", serve.shutdown),
    ]
    if started_local:
        import ray

        steps.append(("stopping ray", ray.shutdown))
    for what, step in steps:
        log.info(what, extra={"stage": "shutdown"})
        try:
            step()
        except Exception as exc:  # noqa: BLE001 — the next steps must still run
            log.warning("%s failed: %s", what, _first_line(exc), extra={"stage": "shutdown"})
    log.info("stopped", extra={"stage": "shutdown"})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
