"""The test network guard refuses every destination outside 127.0.0.0/8 and ::1 before any packet is sent."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from tests.conftest import REPO_ROOT
from tests.support.network_guard import (
    ForbiddenNetworkAccess,
    NetworkGuard,
    install_socket_spy,
    is_allowed_destination,
    is_allowed_lookup,
    is_loopback_target,
)


@pytest.mark.parametrize(
    ("family", "address", "allowed"),
    [
        (socket.AF_INET, ("127.0.0.1", 9092), True),
        (socket.AF_INET, ("127.255.0.7", 80), True),
        (socket.AF_INET, ("localhost", 6379), True),
        (socket.AF_INET6, ("::1", 80, 0, 0), True),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0), True),
        (socket.AF_UNIX, "/tmp/some.sock", True),
        (socket.AF_INET, ("10.0.0.1", 9), False),
        (socket.AF_INET, ("169.254.169.254", 80), False),
        (socket.AF_INET, ("192.168.1.1", 80), False),
        (socket.AF_INET, ("0.0.0.0", 80), False),
        (socket.AF_INET, ("8.8.8.8", 53), False),
        (socket.AF_INET, ("example.com", 80), False),
        (socket.AF_INET6, ("::ffff:10.0.0.1", 80, 0, 0), False),
        (socket.AF_INET6, ("fe80::1%lo", 80, 0, 2), False),
        (socket.AF_INET6, ("2001:db8::1", 443, 0, 0), False),
        (socket.AF_INET, None, False),
    ],
)
def test_destination_rule_allows_only_loopback(family: int, address: object, allowed: bool) -> None:
    assert is_allowed_destination(family, address) is allowed


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("10.0.0.1", True),  # a literal is parsed, never looked up; its connect is checked instead
        ("localhost", True),
        (None, True),
        ("my-host", True),  # the machine's own name (passed below)
        ("metadata.google.internal", False),
        ("images.example.com", False),
    ],
)
def test_lookup_rule_refuses_names_that_need_dns(host: object, allowed: bool) -> None:
    assert is_allowed_lookup(host, own_hostname="my-host") is allowed


def test_connect_to_a_private_address_is_refused_before_the_real_connect(network_guard: NetworkGuard) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Non-blocking: had the real connect run, it would return at once (EINPROGRESS) having sent a SYN.
        sock.setblocking(False)
        with pytest.raises(ForbiddenNetworkAccess):
            sock.connect(("10.0.0.1", 9))
        # The socket never started connecting: the kernel has no peer for it.
        with pytest.raises(OSError) as not_connected:
            sock.getpeername()
        assert not_connected.value.errno == errno.ENOTCONN
        with pytest.raises(ForbiddenNetworkAccess):
            sock.connect_ex(("10.0.0.1", 9))
    violations = network_guard.take_violations()
    assert len(violations) == 2
    assert all("10.0.0.1" in v for v in violations)


def test_udp_send_to_a_public_address_is_refused(network_guard: NetworkGuard) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ForbiddenNetworkAccess):
            sock.sendto(b"x", ("8.8.8.8", 53))
        with pytest.raises(ForbiddenNetworkAccess):
            sock.sendto(b"x", 0, ("8.8.8.8", 53))
    assert len(network_guard.take_violations()) == 2


def test_resolving_an_external_name_is_refused_without_a_dns_query(network_guard: NetworkGuard) -> None:
    with pytest.raises(ForbiddenNetworkAccess):
        socket.create_connection(("images.example.com", 443), timeout=1)
    with pytest.raises(ForbiddenNetworkAccess):
        socket.gethostbyname("images.example.com")
    assert len(network_guard.take_violations()) == 2


def test_asyncio_connections_are_guarded(network_guard: NetworkGuard) -> None:
    async def open_private() -> None:
        await asyncio.wait_for(asyncio.open_connection("10.0.0.1", 9), timeout=2)

    with pytest.raises(ForbiddenNetworkAccess):
        asyncio.run(open_private())
    assert network_guard.take_violations()


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_loopback_connections_pass(family: int, host: str, network_guard: NetworkGuard) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection((host, port), timeout=2) as client:
            peer, _ = server.accept()
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
            peer.close()
    assert network_guard.take_violations() == []


@pytest.mark.integration  # a pytest run in a subprocess
def test_a_swallowed_refusal_still_fails_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_swallow="""
        import socket

        def test_swallows_the_error():
            try:
                socket.create_connection(("10.0.0.1", 9), timeout=0.2)
            except Exception:
                pass  # e.g. a fetcher that turns every error into a dead letter

        def test_stays_on_loopback():
            with socket.socket() as server:
                server.bind(("127.0.0.1", 0))
                server.listen()
                socket.create_connection(server.getsockname(), timeout=1).close()
        """
    )
    # Only the guard's hooks and fixture, not this suite's other plugins (the tiny model pulls in torch).
    pytester.makeconftest('pytest_plugins = ["tests.support.network_guard"]')
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_swallows_the_error*", "*connect to ('10.0.0.1', 9)*"]
    )


# -- a fresh guard over a socket spy: the refusal happens before the socket call -----------------------


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
    guard = NetworkGuard().install(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(ForbiddenNetworkAccess):
        sock.connect(("192.0.2.1", 80))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", 9)) != 0  # loopback goes through (nothing listens on 9)
    assert reached == []
    assert [v.split(" (thread")[0] for v in guard.take_violations()] == ["connect to ('192.0.2.1', 80)"]


def test_name_lookups_beyond_localhost_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reached = install_socket_spy(monkeypatch)
    guard = NetworkGuard().install(monkeypatch)
    assert socket.getaddrinfo("127.0.0.1", 80)
    assert socket.getaddrinfo("localhost", 80)
    with pytest.raises(ForbiddenNetworkAccess):
        socket.getaddrinfo("images.example.com", 80)
    with pytest.raises(ForbiddenNetworkAccess):
        socket.gethostbyname("metadata.google.internal")
    assert reached == []
    assert len(guard.take_violations()) == 2


def test_udp_send_beyond_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reached = install_socket_spy(monkeypatch)
    guard = NetworkGuard().install(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(ForbiddenNetworkAccess):
        sock.sendto(b"x", ("192.0.2.1", 53))
    assert reached == []
    assert [v.split(" (thread")[0] for v in guard.take_violations()] == ["sendto to ('192.0.2.1', 53)"]


def test_a_broken_guard_would_be_caught_by_the_spy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sanity check of the harness: without a guard above it, the spy records (and does not perform) the call.
    reached = install_socket_spy(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("192.0.2.1", 80))
    assert reached == ["connect(('192.0.2.1', 80))"]
