"""Guarded fetches against a real HTTP(S) server on 127.0.0.1: what is fetched, what is refused and why.

Hostnames go through the injected ``resolver`` fixture; the autouse network guard fails any test that
tries to reach beyond loopback, so even a broken SSRF guard cannot send a packet outside.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote

import pytest

from tests.images.conftest import TEST_LIMIT_BYTES, FakeResolver
from tests.images.image_server import GOOD_JPEG, GOOD_PNG, ImageServer
from tests.images.network_guard import LoopbackOnlyNetwork, OutboundConnectionBlocked, install_socket_spy
from tests.images.tls import LocalPKI
from worker.config import Settings
from worker.contracts.events import ImageRef
from worker.contracts.rejections import Reason, RejectedError
from worker.images import image_bytes
from worker.images.fetch import fetch_image

SettingsFactory = Callable[..., Settings]


def fetch(url: str, settings: Settings, resolver: FakeResolver | None = None) -> bytes:
    return image_bytes(ImageRef(url=url, turn_index=0), settings, resolver=resolver)


def refusal(url: str, settings: Settings, resolver: FakeResolver | None = None) -> RejectedError:
    with pytest.raises(RejectedError) as caught:
        fetch(url, settings, resolver)
    return caught.value


# --- what is fetched -------------------------------------------------------------------------------


def test_allow_listed_loopback_server_serves_png_and_jpeg(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    settings = image_settings()
    assert fetch(image_server.url("/good.png"), settings) == GOOD_PNG
    # /good.jpg sends "image/jpeg; charset=binary": parameters after the media type are fine.
    assert fetch(image_server.url("/good.jpg"), settings) == GOOD_JPEG


def test_hostname_is_resolved_once_and_sent_as_host_header(
    image_server: ImageServer, image_settings: SettingsFactory, resolver: FakeResolver
) -> None:
    data = fetch(image_server.url("/good.png", host="images.test"), image_settings(), resolver)
    assert data == GOOD_PNG
    # One lookup through the injected resolver; the connection went to the vetted IP (the network guard
    # would have failed the test on a system lookup of "images.test").
    assert resolver.calls == [("images.test", image_server.port)]
    assert image_server.requests == [("/good.png", f"images.test:{image_server.port}")]


def test_allow_listed_ipv6_loopback_is_reached_over_ipv6(image_settings: SettingsFactory) -> None:
    with ImageServer(limit_bytes=TEST_LIMIT_BYTES, bind="::1") as server:
        url = server.url("/good.png", host="[::1]")
        assert fetch(url, image_settings(allow_networks=["::1/128"])) == GOOD_PNG
        assert server.requests == [("/good.png", f"[::1]:{server.port}")]


def test_next_vetted_address_is_tried_when_the_first_refuses(
    image_server: ImageServer, image_settings: SettingsFactory, resolver: FakeResolver
) -> None:
    # fallback.test → 127.0.0.2 (nothing listens there) then 127.0.0.1 (the server).
    assert fetch(image_server.url("/good.png", host="fallback.test"), image_settings(), resolver) == GOOD_PNG


def test_redirects_up_to_the_limit_are_followed(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    result = fetch_image(
        image_server.url("/chain/3"), image_settings(max_redirects=3).image_fetch, TEST_LIMIT_BYTES
    )
    assert result.data == GOOD_PNG
    assert result.redirects == 3
    assert result.content_type == "image/png"


def test_body_of_exactly_the_limit_is_accepted(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    assert len(fetch(image_server.url("/exact-limit"), image_settings())) == TEST_LIMIT_BYTES


# --- refused before any connection -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("2130706433", "loopback"),  # decimal form of 127.0.0.1
        ("0177.0.0.1", "loopback"),  # octal
        ("0x7f.0.0.1", "loopback"),  # hex
        ("[::1]", "loopback"),
        ("10.0.0.5", "private"),
        ("169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "metadata"),
        ("[::ffff:10.0.0.1]", "10.0.0.1"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("private.test", "private"),
        ("metadata.test", "metadata"),
        ("metadata6.test", "metadata"),
        ("v6loop.test", "loopback"),
        ("mapped.test", "10.0.0.1"),
        ("cgnat.test", "CGNAT"),
        ("mixed.test", "private"),
    ],
)
def test_blocked_targets_are_refused_without_connecting(
    host: str, why: str, image_server: ImageServer, image_settings: SettingsFactory, resolver: FakeResolver
) -> None:
    error = refusal(image_server.url("/good.png", host=host), image_settings(allow_networks=[]), resolver)
    assert error.rejection.reason is Reason.IMAGE_BLOCKED_ADDRESS
    assert why in error.rejection.message
    assert image_server.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/_GET",
        "ftp://example.test/image.png",
        "javascript:alert(1)",
        "dict://127.0.0.1:11211/stats",
        "//example.test/no-scheme.png",
    ],
)
def test_non_http_schemes_are_refused(url: str, image_settings: SettingsFactory) -> None:
    assert refusal(url, image_settings()).rejection.reason is Reason.UNSUPPORTED_URL_SCHEME


def test_http_is_refused_when_only_https_is_allowed(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    error = refusal(image_server.url("/good.png"), image_settings(allowed_schemes=["https"]))
    assert error.rejection.reason is Reason.UNSUPPORTED_URL_SCHEME
    assert image_server.requests == []


def test_disabled_fetching_refuses_every_url(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    error = refusal(image_server.url("/good.png"), image_settings(enabled=False))
    assert error.rejection.reason is Reason.IMAGE_FETCH_DISABLED
    assert image_server.requests == []


def test_urls_with_credentials_are_refused(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    error = refusal(f"http://user:secret@127.0.0.1:{image_server.port}/good.png", image_settings())
    assert error.rejection.reason is Reason.IMAGE_FETCH_FAILED
    assert image_server.requests == []


def test_unresolvable_name_fails_the_fetch(image_settings: SettingsFactory, resolver: FakeResolver) -> None:
    assert (
        refusal("http://unknown.test/x.png", image_settings(), resolver).rejection.reason
        is Reason.IMAGE_FETCH_FAILED
    )


# --- redirects ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target_host", "why"),
    [
        ("private.test", "private"),
        ("metadata.test", "metadata"),
        ("v6loop.test", "loopback"),
        ("loop2.test", "loopback"),  # 127.0.0.2: outside the allow-list 127.0.0.1/32 of this test
        ("169.254.169.254", "metadata"),
    ],
)
def test_redirect_targets_are_vetted_again(
    target_host: str,
    why: str,
    image_server: ImageServer,
    image_settings: SettingsFactory,
    resolver: FakeResolver,
) -> None:
    target = quote(f"http://{target_host}:{image_server.port}/good.png", safe="")
    settings = image_settings(allow_networks=["127.0.0.1/32"])
    error = refusal(image_server.url(f"/redirect?to={target}"), settings, resolver)
    assert error.rejection.reason is Reason.IMAGE_BLOCKED_ADDRESS
    assert why in error.rejection.message
    assert image_server.paths == [f"/redirect?to={target}"]  # the first hop was fetched, the target never


def test_redirect_to_an_allowed_hostname_is_followed(
    image_server: ImageServer, image_settings: SettingsFactory, resolver: FakeResolver
) -> None:
    target = quote(f"http://loop.test:{image_server.port}/good.png", safe="")
    assert fetch(image_server.url(f"/redirect?to={target}"), image_settings(), resolver) == GOOD_PNG
    assert image_server.requests[-1] == ("/good.png", f"loop.test:{image_server.port}")


def test_redirect_to_a_file_url_is_refused(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    error = refusal(image_server.url("/redirect?to=file%3A%2F%2F%2Fetc%2Fpasswd"), image_settings())
    assert error.rejection.reason is Reason.UNSUPPORTED_URL_SCHEME


def test_redirect_loop_stops_at_the_limit(image_server: ImageServer, image_settings: SettingsFactory) -> None:
    error = refusal(image_server.url("/loop"), image_settings(max_redirects=3))
    assert error.rejection.reason is Reason.IMAGE_TOO_MANY_REDIRECTS
    assert image_server.paths == ["/loop"] * 4  # the URL plus three redirects, then no more requests


def test_one_redirect_too_many_is_refused(image_server: ImageServer, image_settings: SettingsFactory) -> None:
    error = refusal(image_server.url("/chain/3"), image_settings(max_redirects=2))
    assert error.rejection.reason is Reason.IMAGE_TOO_MANY_REDIRECTS


def test_no_redirects_allowed_refuses_the_first(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    error = refusal(image_server.url("/chain/1"), image_settings(max_redirects=0))
    assert error.rejection.reason is Reason.IMAGE_TOO_MANY_REDIRECTS


# --- responses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/html", Reason.IMAGE_BAD_CONTENT_TYPE),
        ("/no-type", Reason.IMAGE_BAD_CONTENT_TYPE),
        ("/gzip", Reason.IMAGE_FETCH_FAILED),
        ("/status/404", Reason.IMAGE_FETCH_FAILED),
        ("/status/500", Reason.IMAGE_FETCH_FAILED),
        ("/big-close", Reason.IMAGE_TOO_LARGE),
        ("/big-chunked", Reason.IMAGE_TOO_LARGE),
    ],
)
def test_bad_responses_are_refused_with_their_reason(
    path: str, reason: Reason, image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    assert refusal(image_server.url(path), image_settings()).rejection.reason is reason


def test_declared_oversize_is_refused_before_reading_the_body(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    # The server declares 1 GB, sends 10 bytes and stalls: reading would end in a timeout, not "too large".
    error = refusal(
        image_server.url("/declared-huge"), image_settings(read_timeout_s=5.0, total_timeout_s=10.0)
    )
    assert error.rejection.reason is Reason.IMAGE_TOO_LARGE
    assert "1000000000" in error.rejection.message


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body"])
def test_server_stalling_past_the_read_timeout_is_a_timeout(
    path: str, image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    assert refusal(image_server.url(path), image_settings()).rejection.reason is Reason.IMAGE_FETCH_TIMEOUT


def test_dripping_server_is_cut_off_by_the_overall_deadline(
    image_server: ImageServer, image_settings: SettingsFactory
) -> None:
    # One byte per 50 ms never trips the 0.4 s read timeout; only the 1.0 s overall deadline ends it
    # (the whole body would take 200 s).
    settings = image_settings(read_timeout_s=0.4, total_timeout_s=1.0)
    started = time.monotonic()
    error = refusal(image_server.url("/drip"), settings)
    assert error.rejection.reason is Reason.IMAGE_FETCH_TIMEOUT
    assert time.monotonic() - started < 30  # a sanity bound against a hang, not a speed assertion


def test_connection_refused_fails_the_fetch(image_settings: SettingsFactory) -> None:
    with ImageServer(limit_bytes=TEST_LIMIT_BYTES) as stopped:
        url = stopped.url("/good.png")
    assert refusal(url, image_settings()).rejection.reason is Reason.IMAGE_FETCH_FAILED


# --- the safety net under the guard --------------------------------------------------------------------


def test_an_allow_listed_private_address_is_stopped_by_the_network_guard(
    image_settings: SettingsFactory, resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 10.0.0.0/8 allow-listed the SSRF guard lets the fetch connect to 10.0.0.5: the test network
    # guard must stop that connect before the socket call — what protects CI if the SSRF guard broke.
    # (A socket spy sits underneath, so even a broken network guard would send nothing here.)
    reached = install_socket_spy(monkeypatch)
    network = LoopbackOnlyNetwork().install(monkeypatch)
    settings = image_settings(allow_networks=["10.0.0.0/8"])
    with pytest.raises(OutboundConnectionBlocked):
        fetch("http://private.test/good.png", settings, resolver)
    assert network.violations == ["connect(('10.0.0.5', 80))"]
    assert reached == []


# --- https ------------------------------------------------------------------------------------------------


def test_https_verifies_the_certificate_against_the_url_name_while_connecting_to_the_ip(
    tls_image_server: ImageServer,
    image_settings: SettingsFactory,
    resolver: FakeResolver,
    local_pki: LocalPKI,
) -> None:
    settings = image_settings(ca_bundle=str(local_pki.ca_pem), total_timeout_s=5.0)
    url = tls_image_server.url("/good.png", host="images.test", scheme="https")
    assert fetch(url, settings, resolver) == GOOD_PNG
    assert tls_image_server.requests == [("/good.png", f"images.test:{tls_image_server.port}")]


def test_https_certificate_for_another_name_is_refused(
    tls_image_server: ImageServer,
    image_settings: SettingsFactory,
    resolver: FakeResolver,
    local_pki: LocalPKI,
) -> None:
    # other.test resolves to the same 127.0.0.1, but the certificate names images.test only.
    settings = image_settings(ca_bundle=str(local_pki.ca_pem), total_timeout_s=5.0)
    url = tls_image_server.url("/good.png", host="other.test", scheme="https")
    error = refusal(url, settings, resolver)
    assert error.rejection.reason is Reason.IMAGE_FETCH_FAILED
    assert tls_image_server.requests == []


def test_https_certificate_from_an_untrusted_ca_is_refused(
    tls_image_server: ImageServer, image_settings: SettingsFactory, resolver: FakeResolver
) -> None:
    url = tls_image_server.url("/good.png", host="images.test", scheme="https")
    error = refusal(url, image_settings(total_timeout_s=5.0), resolver)
    assert error.rejection.reason is Reason.IMAGE_FETCH_FAILED
    assert tls_image_server.requests == []
