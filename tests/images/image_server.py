"""A small HTTP(S) server on 127.0.0.1 that plays good and hostile image hosts for the fetch tests.

Routes (query ``?to=URL`` for ``/redirect``):
``/good.png``, ``/good.jpg``, ``/exact-limit`` (a body exactly ``limit_bytes`` long), ``/redirect``,
``/chain/N`` (N redirects, then ``/good.png``), ``/loop`` (redirects to itself), ``/declared-huge``
(``Content-Length`` of 1 GB, a few bytes, then a stall), ``/big-close`` (no length, body beyond the
limit, close-delimited), ``/big-chunked`` (chunked, beyond the limit), ``/html``, ``/no-type``,
``/html-as-png``, ``/gzip``, ``/status/N``, ``/stall-headers``, ``/stall-body``, ``/drip`` (one byte
every 50 ms, forever). Every request's path and ``Host`` header are recorded in ``requests``.
"""

from __future__ import annotations

import gzip
import http.server
import socket
import ssl
import threading
from typing import Self
from urllib.parse import parse_qs, urlsplit

from tests.images import crafted

GOOD_PNG = crafted.png_rgb((64, 48), crafted.RED)
GOOD_JPEG = crafted.jpeg_rgb((64, 48), crafted.BLUE)


class ImageServer:
    """Threaded HTTP server on ``127.0.0.1`` (or ``::1``) and a free port; ``with ImageServer(...) as server:``."""

    def __init__(
        self, *, limit_bytes: int, ssl_context: ssl.SSLContext | None = None, bind: str = "127.0.0.1"
    ) -> None:
        self.limit_bytes = limit_bytes
        self.requests: list[tuple[str, str | None]] = []
        self.stop_event = threading.Event()
        server_class = _QuietServer6 if ":" in bind else _QuietServer
        self._httpd = server_class((bind, 0), _handler_for(self))
        if ssl_context is not None:
            # Handshake lazily in the request's thread, so a client that aborts it cannot block accept().
            self._httpd.socket = ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()  # releases stalled handlers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _host in self.requests]


class _QuietServer(http.server.ThreadingHTTPServer):
    """Daemon request threads; client aborts (refused TLS, closed sockets) are expected, not logged."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        return


class _QuietServer6(_QuietServer):
    address_family = socket.AF_INET6


def _handler_for(server: ImageServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            return

        def do_GET(self) -> None:  # http.server's naming
            server.requests.append((self.path, ", ".join(self.headers.get_all("Host") or []) or None))
            parts = urlsplit(self.path)
            route = parts.path
            try:
                if route == "/good.png":
                    self._send(200, "image/png", GOOD_PNG)
                elif route == "/good.jpg":
                    self._send(200, "image/jpeg; charset=binary", GOOD_JPEG)
                elif route == "/exact-limit":
                    self._send(200, "image/png", GOOD_PNG + b"\0" * (server.limit_bytes - len(GOOD_PNG)))
                elif route == "/redirect":
                    self._redirect(302, parse_qs(parts.query)["to"][0])
                elif route.startswith("/chain/"):
                    left = int(route.rsplit("/", 1)[1])
                    self._redirect(
                        301 if left % 2 else 307, f"/chain/{left - 1}" if left > 1 else "/good.png"
                    )
                elif route == "/loop":
                    self._redirect(302, "/loop")
                elif route == "/declared-huge":
                    self._headers(200, "image/png", {"Content-Length": str(10**9)})
                    self.wfile.write(GOOD_PNG[:10])
                    self.wfile.flush()
                    server.stop_event.wait(30)
                elif route == "/big-close":
                    self._headers(200, "image/png", {"Connection": "close"})
                    self.wfile.write(GOOD_PNG + b"\0" * (server.limit_bytes * 4))
                    self.close_connection = True
                elif route == "/big-chunked":
                    self._headers(200, "image/png", {"Transfer-Encoding": "chunked"})
                    for _ in range(8):
                        block = b"\0" * server.limit_bytes
                        self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif route == "/html":
                    self._send(200, "text/html; charset=utf-8", crafted.HTML_BYTES)
                elif route == "/no-type":
                    self._send(200, None, GOOD_PNG)
                elif route == "/html-as-png":
                    self._send(200, "image/png", crafted.HTML_BYTES)
                elif route == "/gzip":
                    self._send(200, "image/png", gzip.compress(GOOD_PNG), {"Content-Encoding": "gzip"})
                elif route.startswith("/status/"):
                    self._send(int(route.rsplit("/", 1)[1]), "text/plain", b"no")
                elif route == "/stall-headers":
                    server.stop_event.wait(30)
                elif route == "/stall-body":
                    self._headers(200, "image/png", {"Content-Length": str(len(GOOD_PNG))})
                    self.wfile.write(GOOD_PNG[:10])
                    self.wfile.flush()
                    server.stop_event.wait(30)
                elif route == "/drip":
                    self._headers(200, "image/png", {"Content-Length": str(server.limit_bytes)})
                    for _ in range(server.limit_bytes):
                        if server.stop_event.wait(0.05):
                            break
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                else:
                    self._send(404, "text/plain", b"unknown route")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                self.close_connection = True  # the client gave up, as the tests intend

        def _headers(
            self, status: int, content_type: str | None, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            if content_type is not None:
                self.send_header("Content-Type", content_type)
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()

        def _send(
            self, status: int, content_type: str | None, body: bytes, extra: dict[str, str] | None = None
        ) -> None:
            self._headers(status, content_type, {"Content-Length": str(len(body)), **(extra or {})})
            self.wfile.write(body)

        def _redirect(self, status: int, location: str) -> None:
            self._send(status, "text/plain", b"moved", {"Location": location})

    return Handler
