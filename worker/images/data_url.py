"""``data:`` image URLs to bytes: the one parser, used when a record is decoded (stream, HTTP, check-event).

The contract (``schemas/README.md``) is exactly ``data:image/<subtype>;base64,<payload>`` with a non-empty,
strictly valid base64 payload (no whitespace, correct padding) → else ``bad_data_url``. The media type plays
the role of a fetched image's ``Content-Type``: it must be one of ``image_fetch.allowed_content_types``
(``image_bad_content_type``), and like that header it is only a gate — the bytes are sniffed by
``decode_image``. The size is bounded by ``limits.max_image_bytes`` (``image_too_large``), checked from the
payload's length before anything is decoded.
"""

from __future__ import annotations

import binascii
import re

from worker.contracts.rejections import Reason, RejectedError

_PREFIX = re.compile(r"data:(image/[a-z0-9][a-z0-9.+-]{0,63});base64,", re.IGNORECASE)


def data_url_bytes(url: str, allowed_content_types: list[str], max_bytes: int) -> bytes:
    """The image bytes carried by data URL ``url``; raises ``RejectedError`` with the reason (see module doc)."""
    prefix = _PREFIX.match(url)
    if prefix is None:
        raise RejectedError(Reason.BAD_DATA_URL, "is not of the form data:image/<type>;base64,<base64 data>")
    media_type = prefix.group(1).lower()
    if media_type not in {t.lower() for t in allowed_content_types}:
        raise RejectedError(
            Reason.IMAGE_BAD_CONTENT_TYPE,
            f"has media type {media_type!r}, not one of image_fetch.allowed_content_types "
            f"({', '.join(allowed_content_types)})",
        )
    payload = url[prefix.end() :]
    if not payload:
        raise RejectedError(Reason.BAD_DATA_URL, "has no image data after base64,")
    # Base64 carries 3 bytes per 4 characters: refuse an oversized payload before allocating its decoding.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise RejectedError(
            Reason.IMAGE_TOO_LARGE,
            f"holds about {len(payload) // 4 * 3} image bytes, above limits.max_image_bytes ({max_bytes})",
        )
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedError(Reason.BAD_DATA_URL, f"is not valid base64 ({_base64_fault(exc)})") from None
    if len(data) > max_bytes:
        raise RejectedError(
            Reason.IMAGE_TOO_LARGE,
            f"holds {len(data)} image bytes, above limits.max_image_bytes ({max_bytes})",
        )
    return data


def _base64_fault(exc: Exception) -> str:
    # binascii's messages are about the encoding, never the content; non-ASCII input raises ValueError.
    return str(exc).rstrip(".").lower() if isinstance(exc, binascii.Error) else "non-ASCII characters"
