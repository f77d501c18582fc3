"""Property-based checks (hypothesis) of the two places hostile input meets parsers: hosts and image bytes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.images import crafted
from worker.config import LimitsSettings
from worker.contracts.rejections import RejectedError
from worker.images import decode_image
from worker.images.ssrf import AddressPolicy, parse_ip_literal

POLICY = AddressPolicy.from_cidrs([])
SEEDS = [
    crafted.png_rgb((8, 8)),
    crafted.jpeg_rgb((16, 16)),
    crafted.animated_gif(),
    crafted.palette_png_with_transparency(),
    crafted.exif_rotated_jpeg(),
]


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_numeric_spelling_of_an_ipv4_address_gets_the_canonical_verdict(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    octets = [int(o) for o in str(address).split(".")]
    spellings = [
        str(value),
        hex(value),
        "0" + oct(value)[2:],
        ".".join(f"0{o:o}" if o else "0" for o in octets),
        ".".join(hex(o) for o in octets),
        f"{octets[0]}.{(value & 0xFFFFFF)}",
    ]
    for spelling in spellings:
        assert parse_ip_literal(spelling) == address, spelling
    assert all(
        POLICY.blocked_because(parse_ip_literal(s)) == POLICY.blocked_because(address) for s in spellings
    )


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_mapped_ipv6_gets_the_verdict_of_its_ipv4_address(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert (POLICY.blocked_because(mapped) is None) == (POLICY.blocked_because(v4) is None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF we create
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_images_decode_or_are_rejected_never_crash(seed: bytes, data: st.DataObject) -> None:
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        image = decode_image(bytes(mutated[:cut]), LimitsSettings())
    except RejectedError:
        return
    assert image.mode == "RGB"
    assert image.size[0] * image.size[1] <= LimitsSettings().max_image_pixels
