"""The test network guard itself: it refuses beyond-loopback targets before the real socket call.

Each test puts a socket spy underneath a fresh guard (see ``install_socket_spy``): the spy never
performs a non-loopback call, so these tests send nothing even if the guard were broken.
"""

from __future__ import annotations

import socket

import pytest

from tests.images.network_guard import (
    LoopbackOnlyNetwork,
    OutboundConnectionBlocked,
    install_socket_spy,
    is_loopback_target,
)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "localhost"])
def test_loopback_targets_are_permitted(host: str) -> None:
    assert is_loopback_target(host)


@pytest.mark.parametrize(
    "host", ["10.0.0.5", "169.254.169.254", "192.0.2.1", "::", "fd00:ec2::254", "example.com", "0.0.0.0"]
)
def test_other_targets_are_refused(host: str) -> None:
    assert not is_loopback_target(host)


def test_refused_connect_never_reaches_the_socket_call(monkeypatch: pytest.MonkeyPatch) -> None:
    reached = install_socket_spy(monkeypatch)
    guard = LoopbackOnlyNetwork().install(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(OutboundConnectionBlocked):
        sock.connect(("192.0.2.1", 80))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", 9)) != 0  # loopback goes through (nothing listens on 9)
    assert reached == []
    assert guard.violations == ["connect(('192.0.2.1', 80))"]


def test_name_lookups_beyond_localhost_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reached = install_socket_spy(monkeypatch)
    guard = LoopbackOnlyNetwork().install(monkeypatch)
    assert socket.getaddrinfo("127.0.0.1", 80)
    assert socket.getaddrinfo("localhost", 80)
    with pytest.raises(OutboundConnectionBlocked):
        socket.getaddrinfo("images.example.com", 80)
    with pytest.raises(OutboundConnectionBlocked):
        socket.gethostbyname("metadata.google.internal")
    assert reached == []
    assert len(guard.violations) == 2


def test_udp_send_beyond_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reached = install_socket_spy(monkeypatch)
    guard = LoopbackOnlyNetwork().install(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(OutboundConnectionBlocked):
        sock.sendto(b"x", ("192.0.2.1", 53))
    assert reached == []
    assert guard.violations == ["sendto(('192.0.2.1', 53))"]


def test_a_broken_guard_would_be_caught_by_the_spy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sanity check of the harness: without a guard above it, the spy records (and does not perform) the call.
    reached = install_socket_spy(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("192.0.2.1", 80))
    assert reached == ["connect(('192.0.2.1', 80))"]
