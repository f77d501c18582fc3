"""Image bytes to the RGB picture the model sees, safely.

Order of work, each step cheap before the costly one:

1. **Sniff, don't trust labels.** ``Image.open`` reads only the header and picks the decoder from the
   bytes' magic number, restricted to ``DECODABLE_FORMATS`` (the formats behind the allowed content
   types; Pillow's many exotic decoders stay unreachable from untrusted input). HTML, SVG, empty or
   unknown bytes → ``image_undecodable`` whatever their declared type.
2. **Pixel limits from the header, before decoding.** Width × height above
   ``limits.max_image_pixels`` (decompression bombs: a tiny file declaring huge dimensions) or a side
   above ``limits.max_image_side`` → ``image_too_many_pixels``. The side limit also rejects degenerate
   strips such as 1×100000 (100k pixels pass the pixel limit, but a 100000-px side exceeds the default
   20000): the processor would squeeze such a strip into a tile where it carries no visible content.
   Pillow's own global ``Image.MAX_IMAGE_PIXELS`` is left alone (other code shares it); our check
   runs first and is stricter by default.
3. **JPEG draft.** For big JPEGs, ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT
   scaling), several times cheaper than a full decode followed by a resize. The Mllama processor
   resizes every image to fit a canvas of at most 4 tiles of 560 px, so detail beyond that size never
   reaches the model. We ask for exactly the size the processor will resize to
   (``processor_target_size``, computed with transformers' own Mllama canvas functions); draft never
   goes below the requested size, so the processor still only downsizes and the model sees the same
   detail. For a 4:3 photo that target is 1120×840 — the "≥ ~1120 px on the long side" rule of thumb —
   but a fixed 1120-px bound would be wrong for strips: a 4:1 image fills a 4×1 canvas of 2240×560.
   (If those functions cannot be imported, the fallback bound is the largest canvas side, 2240 px,
   safe for every shape.) The tiny test checkpoint uses smaller tiles, so this is conservative there.
4. **Decode, first frame only.** Animated GIF/PNG/WebP: the first frame is what the model sees
   (Llama Guard 3 Vision takes one still image; later frames are ignored, documented in the README).
   Truncated or corrupt data → ``image_undecodable``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off
   (it is global and would make half-grey pictures look valid).
5. **Orientation.** ``ImageOps.exif_transpose`` applies the EXIF orientation, so a phone photo is
   upright. A corrupt EXIF block does not fail the image; it is decoded as stored.
6. **RGB.** Palette, grey and alpha modes are converted; transparency is composited on **white**
   (what a chat client shows for a transparent PNG on its usual light background, and what keeps
   dark-on-transparent text readable); CMYK via Pillow's conversion (ICC profiles are ignored);
   16-bit grey (``I;16*``, ``I``) is scaled from 0..65535 to 0..255 (Pillow's own conversion would clip
   everything above 255 to white); float ``F`` is read as 0..1 when its maximum is ≤ 1, else clipped to
   0..255.
"""

from __future__ import annotations

import io
import logging
import math
import re

import numpy as np
from PIL import Image, ImageOps

from worker.config import LimitsSettings
from worker.contracts.rejections import Reason, RejectedError

logger = logging.getLogger(__name__)

DECODABLE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
"""Pillow formats tried on untrusted bytes. The JPEG opener also yields MPO (the multi-picture JPEGs
many phone cameras write); its first picture is the photo."""

TILE_SIZE = 560  # Llama Guard 3 Vision's image processor: 560-px tiles...
MAX_TILES = 4  # ...at most 4 per image
FALLBACK_LONG_SIDE = TILE_SIZE * MAX_TILES
"""Largest canvas side (4×1 tiles): a draft bound that is safe for every aspect ratio."""

_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(
    data: bytes, limits: LimitsSettings, *, draft: bool = True, field: str | None = None
) -> Image.Image:
    """Decode ``data`` into an upright RGB image (first frame), enforcing ``limits``.

    ``draft=False`` disables reduced-size JPEG decoding (benchmarks compare both). ``field`` is the image
    URL's place in the event, named by the rejection.
    Raises ``RejectedError`` with ``image_undecodable``, ``image_too_many_pixels`` or ``image_too_large``.
    """
    try:
        return _decode_image(data, limits, draft=draft)
    except RejectedError as exc:
        raise exc.with_field(field) from None


def _decode_image(data: bytes, limits: LimitsSettings, *, draft: bool) -> Image.Image:
    if not data:
        raise RejectedError(Reason.IMAGE_UNDECODABLE, "image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise RejectedError(
            Reason.IMAGE_TOO_LARGE,
            f"image has {len(data)} bytes, above limits.max_image_bytes ({limits.max_image_bytes})",
        )
    try:
        with Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS) as opened:
            _check_dimensions(opened.size, limits)
            if draft and opened.format in ("JPEG", "MPO"):
                _draft(opened)
            opened.load()  # first frame only: the file is positioned at frame 0
            upright = _upright(opened)
            return to_rgb(upright)
    except RejectedError:
        raise
    except Image.DecompressionBombError:
        # Only reachable when limits.max_image_pixels exceeds Pillow's own global bound (2 × 89.5 Mpx).
        raise RejectedError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"image declares more pixels than Pillow allows (limits.max_image_pixels is {limits.max_image_pixels})",
        ) from None
    except Exception as exc:  # noqa: BLE001 — any decoder failure on hostile bytes is a dead letter, not a crash
        logger.debug("image undecodable", extra={"stage": "prepare", "reason": type(exc).__name__})
        raise RejectedError(
            Reason.IMAGE_UNDECODABLE, f"image bytes are not a decodable image ({_describe(exc)})"
        ) from None


def declared_pixels(data: bytes) -> int:
    """Width × height an image's header declares (no decoding); 0 when the header cannot be read
    (``decode_image`` then gives the reason)."""
    try:
        with Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS) as opened:
            width, height = opened.size
    except Exception:  # noqa: BLE001 — hostile bytes: any failure means "unknown", decided by decode_image
        return 0
    return max(width, 0) * max(height, 0)


def _check_dimensions(size: tuple[int, int], limits: LimitsSettings) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise RejectedError(Reason.IMAGE_UNDECODABLE, f"image declares an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise RejectedError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"image is {width}x{height} = {width * height} pixels, above limits.max_image_pixels "
            f"({limits.max_image_pixels})",
        )
    if max(width, height) > limits.max_image_side:
        raise RejectedError(
            Reason.IMAGE_TOO_MANY_PIXELS,
            f"image is {width}x{height}; a side above limits.max_image_side ({limits.max_image_side}) pixels "
            "is not accepted",
        )


def processor_target_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the Mllama image processor (560-px tiles, 4 tiles) resizes a ``width``×``height`` image to."""
    try:
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )
    except ImportError:  # transformers moved them: fall back to the bound that is safe for every shape
        factor = min(1.0, FALLBACK_LONG_SIDE / max(width, height))
        return math.ceil(width * factor), math.ceil(height * factor)
    canvas_height, canvas_width = get_optimal_tiled_canvas(height, width, MAX_TILES, TILE_SIZE)
    new_height, new_width = get_image_size_fit_to_canvas(
        height, width, int(canvas_height), int(canvas_width), TILE_SIZE
    )
    return int(new_width), int(new_height)


def _draft(image: Image.Image) -> None:
    """Ask libjpeg for a DCT-scaled decode no smaller than what the processor will resize to."""
    width, height = image.size
    if width < 2 * TILE_SIZE and height < 2 * TILE_SIZE:
        return  # cannot be halved without dropping below a canvas: skip the computation
    target_width, target_height = processor_target_size(width, height)
    if target_width * 2 <= width and target_height * 2 <= height:  # draft scales are 1/2, 1/4, 1/8
        image.draft("RGB", (target_width, target_height))


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 — a broken EXIF block must not lose an otherwise good picture
        logger.debug(
            "ignoring unreadable EXIF orientation", extra={"stage": "prepare", "reason": type(exc).__name__}
        )
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as described in the module docstring (alpha on white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if (mode == "P" and "transparency" in image.info) or mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P without transparency, CMYK, YCbCr, LAB, HSV


# Pillow names the file object it read from ("cannot identify image file <_io.BytesIO object at 0x7f…>"):
# an internal address, meaningless to the sender; dropped from messages.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _describe(exc: BaseException) -> str:
    text = _OBJECT_REPR.sub("", str(exc).splitlines()[0])[:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
