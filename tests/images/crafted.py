"""Crafted image bytes for the decode tests, built in memory (no fixture files to drift)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved in format ``fmt`` as bytes."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_rgb(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def jpeg_rgb(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED, quality: int = 90) -> bytes:
    return encode(Image.new("RGB", size, color), "JPEG", quality=quality)


def noisy_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A photo-like JPEG (noise compresses badly, so truncation hits real scan data)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=85)


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's signature: a valid PNG header declaring ``width``×``height``, almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """A CMYK JPEG (pure red by default: no cyan, full magenta and yellow)."""
    return encode(Image.new("CMYK", (32, 32), cmyk), "JPEG", quality=95)


def png_16bit_grey(values: list[int]) -> bytes:
    """A 16-bit greyscale PNG, one column per value."""
    row = np.array(values, dtype=np.uint16)[None, :].repeat(4, axis=0)
    return encode(Image.fromarray(row), "PNG")


def palette_png_with_transparency() -> bytes:
    """A palette PNG: left half index 0 (black, fully transparent), right half index 1 (opaque blue)."""
    image = Image.new("P", (8, 4), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * (256 * 3 - 6))
    image.paste(1, (4, 0, 8, 4))
    return encode(image, "PNG", transparency=0)


def rgba_png(rgba: tuple[int, int, int, int]) -> bytes:
    return encode(Image.new("RGBA", (4, 4), rgba), "PNG")


def animated_gif() -> bytes:
    """Two frames: red first, then blue."""
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """64×32 as stored: left half red, right half blue; EXIF says how to rotate it for display."""
    image = Image.new("RGB", (64, 32), RED)
    image.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


HTML_BYTES = b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>"
SVG_BYTES = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10" fill="red"/></svg>'
)
