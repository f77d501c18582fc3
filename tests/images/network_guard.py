"""A network guard for tests: any attempt to reach beyond 127.0.0.0/8 or ::1 fails the test, before any packet.

The guard wraps ``socket.socket.connect``/``connect_ex``/``sendto``/``sendmsg`` and the name lookups
(``getaddrinfo``, ``gethostbyname``...). The check runs before the real call, so a refused connect
never reaches the kernel; a name lookup for anything but ``localhost`` or a numeric address is
refused too (a DNS query is a packet). Violations raise ``OutboundConnectionBlocked`` (an
``AssertionError``, so code under test that catches ``OSError`` cannot swallow it) and are recorded:
the fixture fails the test at teardown even if the code under test swallowed the exception.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest


class OutboundConnectionBlocked(AssertionError):
    """A test tried to reach a non-loopback address or to resolve a name over the network."""


def is_loopback_target(host: object) -> bool:
    """True for numeric 127.0.0.0/8, ::1 (also IPv4-mapped) and the name ``localhost``."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _is_numeric(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return True


class LoopbackOnlyNetwork:
    """Installs the guard with a ``MonkeyPatch``; ``violations`` lists every refused attempt."""

    def __init__(self) -> None:
        self.violations: list[str] = []

    def _refuse(self, what: str) -> None:
        self.violations.append(what)
        raise OutboundConnectionBlocked(f"test tried to reach the network: {what}")

    def _check_address(self, sock: socket.socket, address: Any, call: str) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # AF_UNIX and friends never leave the machine
        host = address[0] if isinstance(address, tuple) and address else address
        if not is_loopback_target(host):
            self._refuse(f"{call}({address!r})")

    def _check_lookup(self, host: object, call: str) -> None:
        if host is None or _is_numeric(host) or is_loopback_target(host):
            return  # numeric lookups and localhost are answered locally
        self._refuse(f"{call}({host!r})")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> LoopbackOnlyNetwork:
        """Wrap the socket functions (whatever is installed now, possibly another guard)."""
        guard = self
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_sendto = socket.socket.sendto
        real_sendmsg = socket.socket.sendmsg

        def connect(sock: socket.socket, address: Any) -> None:
            guard._check_address(sock, address, "connect")
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard._check_address(sock, address, "connect_ex")
            return real_connect_ex(sock, address)

        def sendto(sock: socket.socket, data: bytes, *args: Any) -> int:
            guard._check_address(sock, args[-1], "sendto")
            return real_sendto(sock, data, *args)

        def sendmsg(sock: socket.socket, buffers: Any, *args: Any) -> int:
            if len(args) >= 3 and args[2] is not None:
                guard._check_address(sock, args[2], "sendmsg")
            return real_sendmsg(sock, buffers, *args)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket.socket, "sendto", sendto)
        monkeypatch.setattr(socket.socket, "sendmsg", sendmsg)

        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            real_lookup = getattr(socket, name)

            def lookup(
                host: Any, *args: Any, _real: Any = real_lookup, _name: str = name, **kwargs: Any
            ) -> Any:
                guard._check_lookup(host, _name)
                return _real(host, *args, **kwargs)

            monkeypatch.setattr(socket, name, lookup)
        return self


def install_socket_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in for the kernel in the guard's own tests: non-loopback connects, sends and lookups are
    recorded and refused here (never performed), loopback ones go to the real functions.

    Install it *before* a fresh ``LoopbackOnlyNetwork``: an empty returned list then proves the guard
    stopped every non-loopback attempt before the socket call, and a broken guard still sends nothing.
    """
    reached: list[str] = []
    real_connect = socket.socket.connect
    real_sendto = socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback_target(address[0]):
            reached.append(f"connect({address!r})")
            raise ConnectionRefusedError("socket spy: not performed")
        return real_connect(sock, address)

    def sendto(sock: socket.socket, data: bytes, *args: Any) -> int:
        if not is_loopback_target(args[-1][0]):
            reached.append(f"sendto({args[-1]!r})")
            raise ConnectionRefusedError("socket spy: not performed")
        return real_sendto(sock, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not (host is None or _is_numeric(host) or is_loopback_target(host)):
            reached.append(f"getaddrinfo({host!r})")
            raise socket.gaierror(socket.EAI_NONAME, "socket spy: not performed")
        return real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host: Any) -> str:
        reached.append(f"gethostbyname({host!r})")
        raise socket.gaierror(socket.EAI_NONAME, "socket spy: not performed")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)
    return reached
