"""Guarded HTTP(S) fetch of an image URL from an untrusted event.

Every hop (the URL and each redirect target) is parsed, its scheme checked against
``image_fetch.allowed_schemes``, its host resolved once and vetted by the SSRF guard
(``worker.images.ssrf``); the request then goes to the vetted IP address itself, with the original
name in the ``Host`` header and, for https, as TLS SNI and the name the certificate must match
(``server_hostname`` / ``assert_hostname`` of urllib3's ``HTTPSConnectionPool``). There is no second
DNS lookup, so a rebinding DNS server cannot swap in a private address after the check.

Limits: connect and read timeouts per socket operation, an overall deadline for the whole fetch
(``image_fetch.total_timeout_s``, which also caps each socket timeout, so a server dripping one byte
at a time cannot stretch it), at most ``image_fetch.max_redirects`` redirects, and
``limits.max_image_bytes`` checked against ``Content-Length`` before reading and enforced again while
streaming (for chunked or lying responses).

Content type: the ``Content-Type`` header must name one of ``image_fetch.allowed_content_types``.
That header is only a cheap gate that stops HTML error pages and such before their body is
downloaded; it is never trusted to choose a decoder. ``decode_image`` sniffs the bytes themselves
(Pillow's magic-number detection, restricted to a few formats), so an HTML page labelled
``image/png`` still ends as ``image_undecodable``. Compressed transfer encodings are refused
(we ask for ``identity``) so the byte limit counts what is actually stored and decoded.
"""

from __future__ import annotations

import http.client
import logging
import time
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import (
    HTTPError,
    LocationParseError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from worker.config import ImageFetchSettings
from worker.contracts.rejections import Reason, RejectedError
from worker.images.ssrf import AddressPolicy, IPAddress, Resolver, parse_ip_literal, resolve_and_vet

logger = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """The body of a successful image fetch and what was learned on the way."""

    data: bytes
    content_type: str  # media type from the Content-Type header, lower case, parameters dropped
    redirects: int  # how many redirects were followed


@dataclass(frozen=True, slots=True)
class _Target:
    """One hop's request, parsed from a URL."""

    scheme: str
    host: str  # as in the URL (IDNA-encoded, IPv6 in brackets); used for Host, SNI and certificate checks
    port: int
    request_uri: str

    @property
    def host_header(self) -> str:
        return self.host if self.port == _DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"

    @property
    def bare_host(self) -> str:
        return self.host.strip("[]")


def fetch_image(
    url: str, fetch: ImageFetchSettings, max_bytes: int, *, resolver: Resolver | None = None
) -> FetchedImage:
    """Download ``url`` under the SSRF guard and limits described in the module docstring.

    ``resolver`` maps ``(host, port)`` to IP strings (default ``socket.getaddrinfo``); tests inject one.
    Raises ``RejectedError`` with one of ``image_fetch_disabled``, ``unsupported_url_scheme``,
    ``image_blocked_address``, ``image_fetch_failed``, ``image_fetch_timeout``,
    ``image_too_many_redirects``, ``image_bad_content_type``, ``image_too_large``.
    """
    _parse_target(url, fetch.allowed_schemes)  # an unsupported scheme is refused first, fetching on or off
    if not fetch.enabled:
        raise RejectedError(
            Reason.IMAGE_FETCH_DISABLED, "image URL fetching is disabled (image_fetch.enabled)"
        )
    policy = AddressPolicy.from_cidrs(fetch.allow_networks)
    deadline = time.monotonic() + fetch.total_timeout_s
    current = url
    for redirects in range(fetch.max_redirects + 1):
        target = _parse_target(current, fetch.allowed_schemes)
        _remaining(deadline, target)
        addresses = resolve_and_vet(target.bare_host, target.port, policy, resolver)
        pool, response = _send(target, addresses, fetch, deadline)
        try:
            if response.status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise RejectedError(
                        Reason.IMAGE_FETCH_FAILED,
                        f"image host {target.host} answered HTTP {response.status} without a Location",
                    )
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise RejectedError(
                    Reason.IMAGE_FETCH_FAILED, f"image host {target.host} answered HTTP {response.status}"
                )
            content_type = _checked_content_type(response, fetch.allowed_content_types, target)
            data = _read_body(response, max_bytes, fetch.read_timeout_s, deadline, target)
            logger.debug(
                "fetched image", extra={"stage": "prepare", "bytes": len(data), "redirects": redirects}
            )
            return FetchedImage(data, content_type, redirects)
        finally:
            response.close()
            pool.close()
    raise RejectedError(
        Reason.IMAGE_TOO_MANY_REDIRECTS, f"image URL redirected more than {fetch.max_redirects} times"
    )


def vet_url_offline(url: str, fetch: ImageFetchSettings) -> None:
    """The checks of ``fetch_image``'s first hop that need no network: URL syntax, scheme, credentials, and
    the SSRF policy for a literal IP host (``http://169.254.169.254/``). A host name needs DNS and passes.

    Raises ``RejectedError`` exactly as ``fetch_image`` would for the same URL (same functions, same reasons).
    """
    if not fetch.enabled:
        raise RejectedError(
            Reason.IMAGE_FETCH_DISABLED, "image URL fetching is disabled (image_fetch.enabled)"
        )
    target = _parse_target(url, fetch.allowed_schemes)
    if parse_ip_literal(target.bare_host) is not None:
        resolve_and_vet(target.bare_host, target.port, AddressPolicy.from_cidrs(fetch.allow_networks))


def _parse_target(url: str, allowed_schemes: list[str]) -> _Target:
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationParseError:
        raise RejectedError(Reason.IMAGE_FETCH_FAILED, "image URL is not a valid URL") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in allowed_schemes:
        shown = scheme or "(none)"
        raise RejectedError(
            Reason.UNSUPPORTED_URL_SCHEME,
            f"image URL scheme {shown!r} is not allowed (allowed: {', '.join(allowed_schemes)})",
        )
    if not parsed.host:
        raise RejectedError(Reason.IMAGE_FETCH_FAILED, "image URL has no host")
    if parsed.auth is not None:
        # Credentials in URLs leak into logs and dead letters and are a classic SSRF helper; refuse them.
        raise RejectedError(Reason.IMAGE_FETCH_FAILED, "image URL must not carry credentials (user@host)")
    return _Target(scheme, parsed.host, parsed.port or _DEFAULT_PORTS[scheme], parsed.request_uri)


def _remaining(deadline: float, target: _Target) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RejectedError(
            Reason.IMAGE_FETCH_TIMEOUT, f"fetching the image from {target.host} took too long"
        )
    return left


def _send(
    target: _Target, addresses: list[IPAddress], fetch: ImageFetchSettings, deadline: float
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """GET ``target`` from the first vetted address that accepts a connection; pool and unread response."""
    headers = {
        "Host": target.host_header,
        "User-Agent": fetch.user_agent,
        "Accept": ", ".join(fetch.allowed_content_types),
        "Accept-Encoding": "identity",
    }
    timed_out = False
    for address in addresses:
        left = _remaining(deadline, target)
        timeout = urllib3.Timeout(
            connect=min(fetch.connect_timeout_s, left), read=min(fetch.read_timeout_s, left)
        )
        pool = _pool_for(target, address, timeout, fetch)
        try:
            response = pool.urlopen(
                "GET",
                target.request_uri,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                assert_same_host=False,
                release_conn=False,
            )
            return pool, response
        except NewConnectionError:  # refused/unreachable: the next vetted address may work
            pool.close()
            continue
        except Urllib3TimeoutError as exc:
            pool.close()
            if isinstance(exc, ReadTimeoutError):
                raise RejectedError(
                    Reason.IMAGE_FETCH_TIMEOUT, f"image host {target.host} did not answer in time"
                ) from None
            timed_out = True  # connect timeout: try the next address while the deadline allows
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            pool.close()
            raise RejectedError(
                Reason.IMAGE_FETCH_FAILED,
                f"fetching the image from {target.host} failed ({type(exc).__name__})",
            ) from None
    if timed_out:
        raise RejectedError(Reason.IMAGE_FETCH_TIMEOUT, f"connecting to image host {target.host} timed out")
    raise RejectedError(Reason.IMAGE_FETCH_FAILED, f"could not connect to image host {target.host}")


def _pool_for(
    target: _Target, address: IPAddress, timeout: urllib3.Timeout, fetch: ImageFetchSettings
) -> urllib3.HTTPConnectionPool:
    # The pool's host is the vetted IP: urllib3 connects to it without any DNS lookup.
    common = {"port": target.port, "timeout": timeout, "retries": False, "maxsize": 1, "block": False}
    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(
            str(address),
            cert_reqs="CERT_REQUIRED",
            ca_certs=fetch.ca_bundle,
            server_hostname=target.bare_host,  # SNI
            assert_hostname=target.bare_host,  # certificate must match the URL's name, not the IP
            **common,
        )
    return urllib3.HTTPConnectionPool(str(address), **common)


def _checked_content_type(response: urllib3.BaseHTTPResponse, allowed: list[str], target: _Target) -> str:
    header = response.headers.get("Content-Type")
    media_type = (header or "").split(";", 1)[0].strip().lower()
    if media_type not in {a.lower() for a in allowed}:
        shown = media_type or "missing"
        raise RejectedError(
            Reason.IMAGE_BAD_CONTENT_TYPE,
            f"image host {target.host} sent content type {shown!r}, not one of {', '.join(allowed)}",
        )
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise RejectedError(
            Reason.IMAGE_FETCH_FAILED,
            f"image host {target.host} sent a {encoding!r}-encoded body (identity expected)",
        )
    return media_type


def _read_body(
    response: urllib3.BaseHTTPResponse,
    max_bytes: int,
    read_timeout_s: float,
    deadline: float,
    target: _Target,
) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise RejectedError(
                Reason.IMAGE_FETCH_FAILED, f"image host {target.host} sent a bad Content-Length"
            ) from None
        if declared_bytes > max_bytes:
            raise RejectedError(
                Reason.IMAGE_TOO_LARGE,
                f"image from {target.host} declares {declared_bytes} bytes, above the limit of {max_bytes}",
            )
    body = bytearray()
    try:
        while True:
            _set_socket_timeout(response, min(read_timeout_s, _remaining(deadline, target)))
            chunk = response.read1(_CHUNK_BYTES)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > max_bytes:
                raise RejectedError(
                    Reason.IMAGE_TOO_LARGE,
                    f"image from {target.host} is larger than the limit of {max_bytes} bytes",
                )
    except Urllib3TimeoutError:
        raise RejectedError(
            Reason.IMAGE_FETCH_TIMEOUT, f"image host {target.host} stalled while sending"
        ) from None
    except (HTTPError, OSError, http.client.HTTPException) as exc:
        raise RejectedError(
            Reason.IMAGE_FETCH_FAILED, f"reading the image from {target.host} failed ({type(exc).__name__})"
        ) from None


def _set_socket_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Shrink the read timeout of the response's socket so no single read outlives the deadline."""
    sock = getattr(response.connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)
