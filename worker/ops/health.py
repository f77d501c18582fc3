"""The worker's small HTTP server: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz`` (readiness).

Runs the standard library's ``ThreadingHTTPServer`` in a daemon thread, so it never keeps the process
alive and a slow scrape never blocks the pipeline. Readiness means "model loaded and partitions
assigned" — the pipeline decides that and hands it in as the ``ready`` callable; this module only
turns the answer into 200 or 503 with a JSON body saying why.

Kubernetes probes: liveness → ``/healthz``, readiness → ``/readyz``; Prometheus scrapes ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from worker.ops.metrics import REGISTRY

logger = logging.getLogger(__name__)

Check = Callable[[], bool]


class Status(Protocol):
    """What a status source returns: a typed snapshot (e.g. ``worker.stream.status.PipelineStatus``)."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON body put under ``detail``."""
        ...

    def not_ready_reason(self) -> str:
        """A machine-readable reason for "not ready"."""
        ...


StatusSource = Callable[[], Status]


def _always_live() -> bool:
    return True


class OpsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread.

    ``ready`` and ``live`` are called on every probe (keep them cheap and thread-safe); a callable that
    raises counts as "not ready"/"not live" and the exception type is reported, never the traceback.
    ``status`` (optional, e.g. ``StreamPipeline.status``) is included in the ``/readyz`` JSON body and used
    to name the reason. ``port=0`` binds a free port; ``.port`` tells which after ``start()``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ready: Check = _always_live,
        live: Check = _always_live,
        *,
        status: StatusSource | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.ready = ready
        self.live = live
        self.status = status
        self.registry = registry
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the real one when 0 was requested), else the requested port."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._requested_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9400`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns ``self``. Raises ``OSError`` when the port is taken."""
        if self._server is not None:
            return self
        handler = _make_handler(self)
        server_class = _IPv6Server if ":" in self.host else ThreadingHTTPServer
        self._server = server_class((self.host, self._requested_port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="ops-http", daemon=True
        )
        self._thread.start()
        logger.info("ops endpoint listening", extra={"stage": "ops", "url": self.url})
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the port (idempotent)."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Evaluate readiness once: ``(ready, json_body)``."""
        body: dict[str, Any] = {}
        try:
            ready = bool(self.ready())
        except Exception as exc:  # noqa: BLE001 (a broken check must answer 503, not kill the probe thread)
            return False, {"status": "not_ready", "reason": f"check_failed: {type(exc).__name__}"}
        status: Status | None = None
        if self.status is not None:
            try:
                status = self.status()
                body["detail"] = _jsonable(status.as_dict())
            except Exception as exc:  # noqa: BLE001 (status detail is optional; readiness still answers)
                body["detail_error"] = type(exc).__name__
        body["status"] = "ready" if ready else "not_ready"
        if not ready:
            body["reason"] = status.not_ready_reason() if status is not None else "not_ready"
        return ready, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Evaluate liveness once: ``(live, json_body)``."""
        try:
            live = bool(self.live())
        except Exception as exc:  # noqa: BLE001 (as in readiness)
            return False, {"status": "not_live", "reason": f"check_failed: {type(exc).__name__}"}
        return live, ({"status": "live"} if live else {"status": "not_live", "reason": "not_live"})


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON with ``str`` as fallback so odd status values never break the probe."""
    return json.loads(json.dumps(value, default=str))


def _make_handler(ops: OpsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "moderation-worker-ops"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, encoder(ops.registry), content_type)
            elif path == "/healthz":
                live, body = ops.liveness()
                self._send_json(HTTPStatus.OK if live else HTTPStatus.SERVICE_UNAVAILABLE, body)
            elif path == "/readyz":
                ready, body = ops.readiness()
                self._send_json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
            else:
                self._send_json(
                    HTTPStatus.NOT_FOUND, {"error": "not_found", "paths": ["/metrics", "/healthz", "/readyz"]}
                )

        def do_HEAD(self) -> None:
            self.do_GET()

        def _send_json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes arrive every few seconds; keep them out of INFO logs.
            logger.debug("ops request " + format, *args)

    return Handler
