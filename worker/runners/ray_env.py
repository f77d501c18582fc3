"""Ray's process environment and connection: keep a local instance on 127.0.0.1, connect to a cluster.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported; with it at ``0``
every listener of a local instance (GCS, raylet, object manager, workers) and the node IP are on
127.0.0.1 instead of the machine's external interface (checked with ``ss`` on this machine). So
``local_ray_env()`` must run before ``import ray`` anywhere in the process; it refuses to pretend
otherwise when ``ray`` was already imported without it. ``RAY_AUTH_MODE=disabled`` and
``RAY_USAGE_STATS_ENABLED=0`` keep a local instance from writing a token file and reporting usage.

Settings cross Ray boundaries as plain data (``settings_payload`` / ``settings_from_payload``) and are
NOT re-read from the environment of the actor or replica: the driver's resolved settings win.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from worker.config import Settings

log = logging.getLogger(__name__)

#: Environment of a local Ray instance that stays on the loopback interface (see module docstring).
LOCAL_RAY_ENV: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
#: Namespace of the driver's actors, so they are easy to find with ``ray list actors``.
RAY_NAMESPACE = "moderation-worker"


def local_ray_env() -> None:
    """Set ``LOCAL_RAY_ENV`` in ``os.environ``; call before ``import ray``.

    Raises ``RuntimeError`` when ``ray`` was already imported with external listeners enabled: the
    variable is read at import time, so setting it now would silently not apply.
    """
    os.environ.update(LOCAL_RAY_ENV)
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "ray was imported before worker.runners.ray_env.local_ray_env(); a local instance would listen "
                "on the external interface. Import worker.runners.ray_env (or set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) before anything imports ray."
            )


def cluster_address(settings: Settings) -> str | None:
    """The Ray cluster to join: ``ray.address`` from config, else ``$RAY_ADDRESS``, else None (local)."""
    return settings.ray.address or os.environ.get("RAY_ADDRESS") or None


def _is_loopback_address(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379``, ``ray://127.0.0.1:10001``: a cluster on this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]").lower()
    return host == "localhost" or host.startswith("127.") or host == "::1"


def prepare_ray_import(settings: Settings) -> None:
    """Set the environment ``import ray`` needs for ``settings``: loopback for a local instance.

    A no-op inside a Ray process (actor, replica, Serve controller) or once Ray is initialised here:
    that process's environment was decided when it started.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return
    address = cluster_address(settings)
    if address is None or _is_loopback_address(address):
        local_ray_env()
    else:
        # A real cluster decides its own auth; only keep usage reporting off unless told otherwise.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(settings: Settings) -> bool:
    """Connect to the configured Ray cluster, or start a local instance on 127.0.0.1.

    Returns True when this call started a local instance (the caller then owns ``ray.shutdown()``),
    False when it joined a cluster or Ray was already initialised in this process (tests share one).
    A local instance has no dashboard (≈1 GB less memory) and ``ray.local_num_gpus`` fake GPUs when set.
    """
    prepare_ray_import(settings)
    import ray

    if ray.is_initialized():
        log.info("ray already initialised in this process; reusing it")
        return False
    address = cluster_address(settings)
    kwargs: dict[str, Any] = {}
    if settings.logging.format == "json":
        # A job logging config makes Ray forward worker lines without its "(Actor pid=…)" ANSI prefix, which
        # would otherwise wrap each JSON line; Ray's own lines are JSON too.
        kwargs["logging_config"] = ray.LoggingConfig(encoding="JSON", log_level=settings.logging.level)
    if address is not None:
        log.info("connecting to ray cluster", extra={"stage": "ray_init"})
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=True, **kwargs)
        return False
    if settings.ray.local_num_gpus is not None:
        kwargs["num_gpus"] = settings.ray.local_num_gpus
    log.info("starting a local ray instance on 127.0.0.1", extra={"stage": "ray_init"})
    # address="local" forces a new instance instead of joining one found under /tmp/ray.
    ray.init(
        address="local",
        include_dashboard=False,
        namespace=RAY_NAMESPACE,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    return True


class _ResolvedSettings(Settings):
    """Settings the driver already resolved: the receiving process's environment must not override them."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_payload(settings: Settings) -> dict[str, Any]:
    """Settings as plain picklable data for an actor or replica (secrets kept as ``SecretStr``, not masked)."""
    return settings.model_dump(mode="python")


def settings_from_payload(payload: dict[str, Any] | Settings) -> Settings:
    """Rebuild settings sent by ``settings_payload`` exactly, ignoring this process's ``MW_*`` variables."""
    if isinstance(payload, Settings):
        return payload
    return _ResolvedSettings(**payload)
