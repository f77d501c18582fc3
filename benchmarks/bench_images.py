"""Image decode cost: milliseconds per JPEG through ``decode_image`` (open, limits, decode, EXIF, RGB),
with and without ``Image.draft`` (libjpeg DCT scaling), for a 1024×768 picture and for bigger photos.

Run: ``.venv/bin/python benchmarks/bench_images.py [--repeats N]``. Prints a table; no assertions.

Draft never decodes below the size the Mllama processor resizes to (``processor_target_size``: 560-px
tiles, up to 4), so a 1024×768 JPEG — which already fits a 2×2 canvas — is decoded at full size either
way (the two columns measure the same work); draft pays off for camera-sized photos. The last column
is the SHA-256 of the encoded bytes (the cache key's image part), for scale.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from worker.config import LimitsSettings
from worker.images.decode import decode_image, processor_target_size

SIZES = [(1024, 768), (2048, 1536), (4032, 3024), (6000, 4000)]


def photo_like_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Smooth gradients plus mild noise: compresses like a photo (pure noise would be a worst case)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / 97.0),
            127 + 100 * np.cos(y / 61.0),
            127 + 100 * np.sin((x + y) / 143.0),
        ],
        axis=-1,
    )
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=88)
    return out.getvalue()


def ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (imports, allocator)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    limits = LimitsSettings()
    print(f"decode_image median ms per JPEG ({args.repeats} repeats; decoded size in brackets)")
    print(
        f"{'image':>11} {'KiB':>6} {'processor target':>17} | {'no draft':>19} | {'draft (default)':>19} | "
        f"{'ratio':>5} | {'sha256':>7}"
    )
    for width, height in SIZES:
        data = photo_like_jpeg(width, height)
        columns, timings = [], []
        for draft in (False, True):
            size = decode_image(data, limits, draft=draft).size
            ms = ms_per_call(lambda d=draft, b=data: decode_image(b, limits, draft=d), args.repeats)
            timings.append(ms)
            columns.append(f"{ms:7.2f} [{size[0]}x{size[1]}]")
        target = "x".join(map(str, processor_target_size(width, height)))
        hash_ms = ms_per_call(lambda b=data: hashlib.sha256(b).hexdigest(), args.repeats)
        print(
            f"{width:>5}x{height:<5} {len(data) / 1024:6.0f} {target:>17} | {columns[0]:>19} | {columns[1]:>19} | "
            f"{timings[0] / timings[1]:5.2f} | {hash_ms:7.3f}"
        )


if __name__ == "__main__":
    main()
