"""``data:`` image URLs (RFC 2397) to bytes, with the media-type and size checks of a fetched image.

The media type of a data URL plays the role of a ``Content-Type`` header: it must be one of
``image_fetch.allowed_content_types``, and like that header it is only a gate — the bytes are sniffed
by ``decode_image``. Base64 payloads may contain ASCII whitespace (line-wrapped encoders); anything
else outside the base64 alphabet is ``bad_data_url``. Non-base64 payloads are percent-decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote_to_bytes

from worker.contracts.dead_letters import Reason, RejectedError

_WHITESPACE = re.compile(r"[ \t\r\n\f]+")


def data_url_bytes(
    url: str, allowed_content_types: list[str], max_bytes: int, *, decoded: bytes | None = None
) -> bytes:
    """The bytes carried by data URL ``url``; ``decoded`` = its payload already decoded (by ``decode_event``),
    which is then checked like a fresh decoding instead of being decoded again.

    Raises ``RejectedError`` with ``bad_data_url`` (syntax/base64), ``image_bad_content_type`` (media
    type not allowed) or ``image_too_large`` (checked from the payload length before decoding).
    """
    if url[:5].lower() != "data:":
        raise RejectedError(Reason.BAD_DATA_URL, "image URL is not a data: URL")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise RejectedError(Reason.BAD_DATA_URL, "data: URL has no ',' before its payload")
    params = [p.strip() for p in header.split(";")]
    media_type = params[0].lower()
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    if media_type not in {t.lower() for t in allowed_content_types}:
        shown = media_type or "missing"
        raise RejectedError(
            Reason.IMAGE_BAD_CONTENT_TYPE,
            f"data: URL media type {shown!r} is not one of {', '.join(allowed_content_types)}",
        )
    # Base64 carries 3 bytes per 4 characters: refuse an oversized payload before allocating its decoding.
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes + 3:
        raise RejectedError(
            Reason.IMAGE_TOO_LARGE, f"data: URL image is larger than the limit of {max_bytes} bytes"
        )
    if decoded is not None:
        data = decoded
    else:
        data = _decode_base64(payload) if is_base64 else unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise RejectedError(
            Reason.IMAGE_TOO_LARGE, f"data: URL image is larger than the limit of {max_bytes} bytes"
        )
    return data


def _decode_base64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = _WHITESPACE.sub("", payload)
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding, a common encoder shortcut
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise RejectedError(Reason.BAD_DATA_URL, "data: URL payload is not valid base64") from None
