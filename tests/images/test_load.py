"""The images stage's entry points: data URLs to bytes, URL schemes, and the content hash of the cache key."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest

from tests.images import crafted
from tests.images.conftest import TEST_LIMIT_BYTES
from worker.config import Settings
from worker.contracts.events import ImageRef
from worker.contracts.rejections import Reason, RejectedError
from worker.images import decode_image, image_bytes, image_content_hash

SettingsFactory = Callable[..., Settings]
PNG = crafted.png_rgb((8, 8), crafted.RED)


def data_url(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def load(url: str, settings: Settings) -> bytes:
    return image_bytes(ImageRef(url=url, turn_index=0), settings)


def test_bytes_decoded_by_decode_event_are_used_not_parsed_again(image_settings: SettingsFactory) -> None:
    settings = image_settings()
    already = b"bytes the decoder kept"
    assert image_bytes(ImageRef(url=data_url(PNG), turn_index=0, data=already), settings) == already


def reason_of(url: str, settings: Settings) -> Reason:
    with pytest.raises(RejectedError) as caught:
        load(url, settings)
    return caught.value.rejection.reason


def test_base64_data_url_yields_its_bytes_and_decodes(image_settings: SettingsFactory) -> None:
    settings = image_settings()
    data = load(data_url(PNG), settings)
    assert data == PNG
    assert decode_image(data, settings.limits).getpixel((4, 4)) == crafted.RED


def test_scheme_and_media_type_are_case_insensitive(image_settings: SettingsFactory) -> None:
    assert load("DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode(), image_settings()) == PNG


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;name=x.png;base64," + base64.b64encode(PNG).decode(),  # extra parameters
        "data:image/png;base64,"
        + "\n".join(base64.b64encode(PNG).decode()[i : i + 76] for i in range(0, 200, 76))
        + base64.b64encode(PNG).decode()[228:],  # line-wrapped
        "data:image/png;base64," + base64.b64encode(PNG + b"\0").decode().rstrip("="),  # padding left out
        "data:image/png," + "".join(f"%{b:02x}" for b in PNG),  # percent-encoded, not base64
    ],
)
def test_data_urls_outside_the_contract_are_bad_data_urls(url: str, image_settings: SettingsFactory) -> None:
    """The chat-event contract: exactly data:image/<type>;base64,<strict base64> (schemas/README.md)."""
    assert reason_of(url, image_settings()) is Reason.BAD_DATA_URL


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64", Reason.BAD_DATA_URL),
        ("data:image/png;base64,!!!not-base64!!!", Reason.BAD_DATA_URL),
        ("data:image/png;base64,aGVsbG8=ZXh0cmE=", Reason.BAD_DATA_URL),
        (
            "data:text/html;base64," + base64.b64encode(crafted.HTML_BYTES).decode(),
            Reason.BAD_DATA_URL,  # the contract allows data:image/<type> only
        ),
        (
            "data:image/svg+xml;base64," + base64.b64encode(crafted.SVG_BYTES).decode(),
            Reason.IMAGE_BAD_CONTENT_TYPE,
        ),
        ("data:;base64," + base64.b64encode(PNG).decode(), Reason.BAD_DATA_URL),
        (data_url(b"\0" * (TEST_LIMIT_BYTES + 1)), Reason.IMAGE_TOO_LARGE),
        (data_url(b"\0" * (TEST_LIMIT_BYTES * 50)), Reason.IMAGE_TOO_LARGE),
    ],
)
def test_bad_data_urls_are_refused_with_their_reason(
    url: str, reason: Reason, image_settings: SettingsFactory
) -> None:
    assert reason_of(url, image_settings()) is reason


def test_data_url_of_exactly_the_limit_is_accepted(image_settings: SettingsFactory) -> None:
    assert len(load(data_url(b"\0" * TEST_LIMIT_BYTES), image_settings())) == TEST_LIMIT_BYTES


def test_html_labelled_as_png_passes_the_label_gate_but_not_the_decoder(
    image_settings: SettingsFactory,
) -> None:
    settings = image_settings()
    data = load(data_url(crafted.HTML_BYTES, "image/png"), settings)
    with pytest.raises(RejectedError) as caught:
        decode_image(data, settings.limits)
    assert caught.value.rejection.reason is Reason.IMAGE_UNDECODABLE


def test_data_urls_work_when_url_fetching_is_disabled(image_settings: SettingsFactory) -> None:
    assert load(data_url(PNG), image_settings(enabled=False)) == PNG


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "ftp://x/a.png", "no-scheme.png"])
def test_unsupported_schemes_win_over_disabled_fetching(url: str, image_settings: SettingsFactory) -> None:
    assert reason_of(url, image_settings(enabled=False)) is Reason.UNSUPPORTED_URL_SCHEME


def test_content_hash_is_sha256_of_the_encoded_bytes() -> None:
    assert image_content_hash(PNG) == hashlib.sha256(PNG).hexdigest()
    assert len(image_content_hash(b"")) == 64
    # Same pixels, different encoding → different key (a miss, never a wrong verdict).
    assert image_content_hash(crafted.png_rgb((8, 8))) != image_content_hash(
        crafted.encode(decode_image(PNG, Settings().limits), "PNG", compress_level=1)
    )
