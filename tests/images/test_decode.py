"""Crafted and hostile images: each is converted to the RGB picture the model should see, or refused
with its specific reason."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from tests.images import crafted
from worker.config import LimitsSettings
from worker.contracts.rejections import Reason, RejectedError
from worker.images import decode_image
from worker.images.decode import processor_target_size, to_rgb

LIMITS = LimitsSettings()


def refusal(data: bytes, limits: LimitsSettings = LIMITS) -> Reason:
    with pytest.raises(RejectedError) as caught:
        decode_image(data, limits)
    return caught.value.rejection.reason


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_plain_png_and_jpeg_decode_to_rgb() -> None:
    png = decode_image(crafted.png_rgb((64, 48), crafted.RED), LIMITS)
    assert (png.mode, png.size, png.getpixel((10, 10))) == ("RGB", (64, 48), crafted.RED)
    jpeg = decode_image(crafted.jpeg_rgb((64, 48), crafted.BLUE), LIMITS)
    assert jpeg.mode == "RGB" and jpeg.size == (64, 48)
    assert close_to(jpeg.getpixel((10, 10)), crafted.BLUE)


# --- refused -------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns; we refuse
def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = crafted.png_header_only(10_000, 10_000)  # 100 Mpx declared in a file of under 100 bytes
    assert len(bomb) < 100
    assert refusal(bomb) is Reason.IMAGE_TOO_MANY_PIXELS


def test_bomb_beyond_pillows_own_hard_limit_is_refused_with_the_same_reason() -> None:
    generous = LimitsSettings(max_image_pixels=10**12, max_image_side=10**6)
    assert refusal(crafted.png_header_only(100_000, 100_000), generous) is Reason.IMAGE_TOO_MANY_PIXELS


def test_pixel_limit_applies_below_pillows_default() -> None:
    tight = LimitsSettings(max_image_pixels=64 * 48 - 1)
    assert refusal(crafted.png_rgb((64, 48)), tight) is Reason.IMAGE_TOO_MANY_PIXELS
    assert decode_image(crafted.png_rgb((64, 48)), LimitsSettings(max_image_pixels=64 * 48)).size == (64, 48)


def test_a_1x100000_strip_is_refused_by_the_side_limit_but_allowed_when_configured() -> None:
    strip = crafted.encode(Image.new("L", (1, 100_000), 128), "PNG")
    # 100,000 pixels pass max_image_pixels (40 M) but the 100,000-px side exceeds max_image_side (20,000).
    assert refusal(strip) is Reason.IMAGE_TOO_MANY_PIXELS
    image = decode_image(strip, LimitsSettings(max_image_side=100_000))
    assert (image.mode, image.size, image.getpixel((0, 50_000))) == ("RGB", (1, 100_000), (128, 128, 128))


def test_truncated_jpeg_is_undecodable() -> None:
    photo = crafted.noisy_jpeg((256, 256))
    assert refusal(photo[: len(photo) // 2]) is Reason.IMAGE_UNDECODABLE


def test_truncated_png_is_undecodable() -> None:
    picture = crafted.encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), "PNG"
    )
    assert refusal(picture[: len(picture) * 2 // 3]) is Reason.IMAGE_UNDECODABLE


def test_truncation_stays_an_error_globally() -> None:
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_bytes_is_undecodable() -> None:
    assert refusal(b"") is Reason.IMAGE_UNDECODABLE


@pytest.mark.parametrize(
    "data", [crafted.HTML_BYTES, crafted.SVG_BYTES, b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]
)
def test_html_svg_and_bare_magic_numbers_are_undecodable(data: bytes) -> None:
    assert refusal(data) is Reason.IMAGE_UNDECODABLE


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_outside_the_allowed_content_types_are_not_decoded(fmt: str) -> None:
    assert refusal(crafted.encode(Image.new("RGB", (16, 16), crafted.RED), fmt)) is Reason.IMAGE_UNDECODABLE


def test_bytes_above_the_image_limit_are_refused() -> None:
    limits = LimitsSettings(max_image_bytes=1024)
    assert refusal(crafted.noisy_jpeg((64, 64)), limits) is Reason.IMAGE_TOO_LARGE


# --- converted ----------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour() -> None:
    image = decode_image(crafted.cmyk_jpeg((0, 255, 255, 0)), LIMITS)
    assert image.mode == "RGB"
    assert close_to(image.getpixel((16, 16)), (255, 0, 0))


def test_16_bit_png_is_scaled_to_8_bits_not_clipped() -> None:
    image = decode_image(crafted.png_16bit_grey([0, 1000, 32896, 65535]), LIMITS)
    assert image.mode == "RGB"
    # 1000/257 ≈ 4 (Pillow's plain conversion would clip it to 255); 32896/257 = 128.
    assert [image.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (4, 4, 4),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_palette_png_transparency_is_composited_on_white() -> None:
    image = decode_image(crafted.palette_png_with_transparency(), LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)  # transparent black → white background
    assert image.getpixel((6, 1)) == crafted.BLUE  # opaque entry keeps its colour


def test_half_transparent_rgba_is_blended_on_white() -> None:
    image = decode_image(crafted.rgba_png((255, 0, 0, 128)), LIMITS)
    assert close_to(image.getpixel((1, 1)), (255, 127, 127), tolerance=1)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (0, 255), (0, 0, 0)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("I", 65535, (255, 255, 255)),
        ("I;16", 257 * 10, (10, 10, 10)),
        ("F", 0.5, (128, 128, 128)),
        ("F", 200.0, (200, 200, 200)),
    ],
)
def test_every_mode_converts_to_rgb(mode: str, value: object, expected: tuple[int, int, int]) -> None:
    image = to_rgb(Image.new(mode, (2, 2), value))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == expected


def test_animated_gif_yields_its_first_frame() -> None:
    data = crafted.animated_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert close_to(image.getpixel((8, 8)), crafted.RED)


def test_exif_orientation_is_applied() -> None:
    # Stored 64×32 with red left, blue right; orientation 6 = rotate 90° clockwise for display:
    # upright it is 32×64 with red on top and blue at the bottom.
    image = decode_image(crafted.exif_rotated_jpeg(orientation=6), LIMITS)
    assert image.size == (32, 64)
    assert close_to(image.getpixel((16, 8)), crafted.RED, tolerance=12)
    assert close_to(image.getpixel((16, 56)), crafted.BLUE, tolerance=12)


def test_image_without_exif_keeps_its_orientation() -> None:
    image = decode_image(crafted.exif_rotated_jpeg(orientation=1), LIMITS)
    assert image.size == (64, 32)
    assert close_to(image.getpixel((8, 16)), crafted.RED, tolerance=12)


@pytest.mark.parametrize(
    ("size", "drafted"),
    [
        ((4032, 3024), (2016, 1512)),  # phone photo: processor target 1120×840, DCT scale 1/2
        ((5000, 1000), (2500, 500)),  # strip: target 2240×448 (a 4×1 canvas), so only 1/2 again
        ((1000, 5000), (500, 2500)),
        ((4480, 4480), (1120, 1120)),  # target 1120×1120: scale 1/4
        ((4000, 600), (4000, 600)),  # target 2240×336: halving would undershoot, so no draft
        ((1024, 768), (1024, 768)),  # fits a canvas as is
    ],
)
def test_big_jpegs_are_draft_decoded_never_below_the_processor_target(
    size: tuple[int, int], drafted: tuple[int, int]
) -> None:
    photo = crafted.encode(Image.new("RGB", size, crafted.RED), "JPEG", quality=80)
    image = decode_image(photo, LIMITS)
    assert image.size == drafted
    target = processor_target_size(*size)
    assert image.size[0] >= target[0] and image.size[1] >= target[1]
    assert close_to(image.getpixel((image.size[0] // 2, image.size[1] // 2)), crafted.RED)
    assert decode_image(photo, LIMITS, draft=False).size == size


def test_processor_target_size_matches_the_mllama_canvas_rules() -> None:
    assert processor_target_size(4032, 3024) == (1120, 840)  # 2×2 canvas
    assert processor_target_size(8000, 2000) == (2240, 560)  # 4×1 canvas
    assert processor_target_size(300, 200) == (560, 373)  # small images are scaled up to one tile


def test_decoded_image_does_not_depend_on_the_input_buffer() -> None:
    data = bytearray(crafted.png_rgb((8, 8), crafted.RED))
    image = decode_image(bytes(data), LIMITS)
    data[:] = b"\0" * len(data)
    assert image.getpixel((4, 4)) == crafted.RED


def test_draft_bound_falls_back_to_the_largest_canvas_side_without_transformers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "transformers.models.mllama.image_processing_pil_mllama", None)
    assert processor_target_size(4032, 3024) == (2240, 1680)
    assert processor_target_size(1000, 500) == (1000, 500)
