"""Startup checks: every dependency a command needs is probed before the model is loaded.

Loading the model takes seconds (minutes for the real weights); finding out afterwards that the broker's
address is wrong wastes that time and ends in a traceback. Each check is a cheap TCP connect or bind with
a short timeout and fails with a ``StartupError`` whose one-line message names the configuration key:

| dependency | key | on failure |
| --- | --- | --- |
| Kafka broker (any bootstrap server answers) | ``kafka.bootstrap_servers`` | stop, exit 2 |
| Ray cluster, when an address is configured | ``ray.address`` | stop, exit 2 |
| HTTP port of ``serve`` / ops port of ``run`` free | ``serve.port`` / ``ops.port`` | stop, exit 2 |
| model weights directory exists (unless joining a Ray cluster: the nodes hold it) | ``model.path`` | stop, exit 2 |
| Redis verdict cache | ``redis.url`` | degrade: one warning, run uncached, reconnect |

Redis is optional by design (the cache only saves work), so an unreachable Redis is a warning: the worker
starts uncached (``mw_redis_up 0``) and reconnects every ``redis.reconnect_interval_s``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from worker.config import Settings, mask_url_credentials

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0


class StartupError(Exception):
    """A startup dependency is missing or misconfigured; the message is one line naming the key."""


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` → ``(host, port)``; ValueError when the port is not a number."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port)
    return address, default_port


def _connect_fault(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to ``host:port`` fails (``connection refused``, ``timed out``…), or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return "timed out"
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def check_kafka(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """At least one of ``kafka.bootstrap_servers`` accepts a TCP connection (a client needs only one)."""
    faults = []
    for server in settings.kafka.bootstrap_servers:
        try:
            host, port = split_host_port(server, 9092)
        except ValueError:
            raise StartupError(f"kafka.bootstrap_servers: {server!r} is not host:port") from None
        fault = _connect_fault(host, port, timeout_s)
        if fault is None:
            return
        faults.append(f"{server} ({fault})")
    raise StartupError(f"kafka.bootstrap_servers: no broker reachable: {', '.join(faults)}")


def check_ray_address(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """The configured Ray cluster address (``ray.address``; ``auto``/``local`` are Ray's own) answers."""
    address = settings.ray.address
    if not address or address in ("auto", "local"):
        return
    try:
        host, port = split_host_port(address.split("://", 1)[-1], 6379)
    except ValueError:
        raise StartupError(f"ray.address: {address!r} is not host:port") from None
    fault = _connect_fault(host, port, timeout_s)
    if fault is not None:
        raise StartupError(f"ray.address: no Ray cluster reachable at {address} ({fault})")


def check_port_free(host: str, port: int, key: str) -> None:
    """``host:port`` can be bound (as servers bind it, with SO_REUSEADDR: a socket in TIME_WAIT is no obstacle)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
            raise StartupError(f"{key}: cannot listen on {host}:{port} ({why})") from None


def check_model_path(settings: Settings) -> None:
    """A ``model.path`` that looks like a directory must exist (a hub id is resolved by the loader)."""
    path = settings.model.path
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        what = "is not a directory" if Path(path).expanduser().exists() else "no such directory"
        raise StartupError(
            f"model.path {path!r}: {what}; build the tiny demo checkpoint there with "
            "`moderation-worker build-tiny-model`, or point model.path (MW_MODEL__PATH) at Llama Guard 3 Vision weights"
        )


def check_redis(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Probe the verdict cache; when it is unreachable, log one warning saying what happens and return it.

    Never raises: the worker runs uncached without Redis and reconnects on its own.
    """
    if not settings.redis.enabled:
        return None
    parts = urlsplit(settings.redis.url)
    if parts.scheme == "unix":
        return None  # a socket path: the cache client reports it on first use
    fault = _connect_fault(parts.hostname or "127.0.0.1", parts.port or 6379, timeout_s)
    if fault is None:
        return None
    message = (
        f"redis.url: verdict cache at {mask_url_credentials(settings.redis.url)} unreachable ({fault}); "
        f"running uncached, reconnecting every {settings.redis.reconnect_interval_s:g} s"
    )
    log.warning(message, extra={"stage": "startup", "reason": "cache_unavailable"})
    return message


def _joins_a_cluster(settings: Settings) -> bool:
    """The model then loads on the cluster's nodes: its path need not exist on this machine."""
    return bool(settings.ray.address or os.environ.get("RAY_ADDRESS"))


def check_run(settings: Settings, *, on_ray: bool = False) -> None:
    """Everything ``moderation-worker run`` needs before it loads the model (raises ``StartupError``)."""
    check_kafka(settings)
    if not (on_ray and _joins_a_cluster(settings)):
        check_model_path(settings)
    check_port_free(settings.ops.host, settings.ops.port, "ops.port")
    if on_ray:
        check_ray_address(settings)


def check_serve(settings: Settings) -> None:
    """Everything ``moderation-worker serve`` needs before it starts Ray (raises ``StartupError``)."""
    if not _joins_a_cluster(settings):
        check_model_path(settings)
    check_port_free(settings.serve.host, settings.serve.port, "serve.port")
    check_ray_address(settings)
