"""The images stage's public entry points: an event's image reference to bytes, bytes to RGB, bytes to a hash.

``image_bytes`` → ``image_content_hash`` → (cache lookup) → ``decode_image`` is the intended order:
the cache key uses the hash of the *encoded bytes* because it is known before the costly decode, so a
cache hit skips decoding (and tiling) entirely. The price is that the same picture re-encoded
(another JPEG quality, stripped EXIF) gets another key — a cache miss, never a wrong verdict, since
different bytes can decode to different pixels (EXIF orientation, first frame of an animation).
"""

from __future__ import annotations

import hashlib

from worker.config import Settings
from worker.contracts.events import ImageRef
from worker.contracts.rejections import RejectedError
from worker.images.data_url import data_url_bytes
from worker.images.decode import decode_image
from worker.images.fetch import fetch_image, vet_url_offline
from worker.images.ssrf import Resolver

__all__ = ["check_image_offline", "decode_image", "image_bytes", "image_content_hash"]


def image_bytes(ref: ImageRef, settings: Settings, *, resolver: Resolver | None = None) -> bytes:
    """The encoded bytes of ``ref``: a ``data:`` URL decoded, an ``http(s)`` URL fetched under the SSRF guard.

    Limits: ``settings.limits.max_image_bytes`` and ``settings.image_fetch`` (schemes, timeouts,
    redirects, content types, allow-list). ``resolver`` replaces DNS (tests; default ``getaddrinfo``).
    Raises ``RejectedError`` with a specific image reason (see ``worker.images.fetch``), naming the image
    URL's field (``ref.field_path``).
    """
    try:
        return _image_bytes(ref, settings, resolver)
    except RejectedError as exc:
        raise exc.with_field(ref.field_path) from None


def _image_bytes(ref: ImageRef, settings: Settings, resolver: Resolver | None) -> bytes:
    allowed_types = settings.image_fetch.allowed_content_types
    max_bytes = settings.limits.max_image_bytes
    if ref.is_data_url:  # decoding the record parsed it already: its bytes travel on the reference
        return ref.data if ref.data is not None else data_url_bytes(ref.url, allowed_types, max_bytes)
    return fetch_image(ref.url, settings.image_fetch, max_bytes, resolver=resolver).data


def check_image_offline(ref: ImageRef, settings: Settings) -> None:
    """Everything about ``ref`` that can be decided without the network, decided as the worker decides it.

    A ``data:`` URL goes through ``image_bytes`` and ``decode_image`` — the stream's and HTTP's own steps —
    so a truncated JPEG, an SVG or a pixel bomb fails here with their reason. An ``http(s)`` URL gets the
    first-hop checks of the fetch (``vet_url_offline``: scheme, syntax, a literal IP in a blocked range);
    a host name is only judged when the worker resolves and fetches it. Raises ``RejectedError``.
    """
    if ref.is_data_url:
        decode_image(image_bytes(ref, settings), settings.limits, field=ref.field_path)
        return
    try:
        vet_url_offline(ref.url, settings.image_fetch)
    except RejectedError as exc:
        raise exc.with_field(ref.field_path) from None


def image_content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the encoded image bytes (the image part of the verdict cache key)."""
    return hashlib.sha256(data).hexdigest()
