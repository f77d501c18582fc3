"""The test network guard: any attempt to reach or resolve a destination outside 127.0.0.0/8 and ::1 fails,
before the real socket call — so no packet leaves the machine even when the code under test is broken.

A pytest plugin (loaded by ``tests/conftest.py``): the guard is installed at ``pytest_configure`` (so
imports at collection time are guarded too), the autouse ``network_guard`` fixture fails the running test
at teardown when anything tried to leave loopback — even if the code under test swallowed the error — and
attempts outside any test fail the session. Tests that expect a refusal claim it with
``network_guard.take_violations()``.

It wraps ``socket.socket.connect``/``connect_ex``/``sendto``/``sendmsg`` and the name lookups
(``getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``): Python sockets of this process (kafka-python,
redis-py, urllib3, aiohttp, asyncio), not subprocesses or C extensions with their own sockets (Ray's gRPC
core). A refusal raises :class:`ForbiddenNetworkAccess`, an ``AssertionError``: code that turns every
``OSError`` into a dead letter cannot take it for a network failure.

``install_socket_spy`` stands in for the kernel in the guard's own tests (see its docstring).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class ForbiddenNetworkAccess(AssertionError):
    """A test tried to reach (or resolve) a destination outside 127.0.0.0/8 and ::1."""


# Names that resolve from /etc/hosts without a DNS query.
_LOOPBACK_NAMES = frozenset(
    {"localhost", "localhost.", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)
_LOCAL_FAMILIES = frozenset(
    f for f in (getattr(socket, "AF_UNIX", None), getattr(socket, "AF_NETLINK", None)) if f is not None
)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _text(host: Any) -> str | None:
    if isinstance(host, bytes):
        return host.decode(errors="replace")
    return host if isinstance(host, str) else None


def is_loopback_target(host: Any) -> bool:
    """True for numeric 127.0.0.0/8, ::1 (also IPv4-mapped) and the loopback names (``localhost``)."""
    text = _text(host)
    if text is None:
        return False
    if text.lower() in _LOOPBACK_NAMES:
        return True
    ip = _ip(text)
    return ip is not None and ip.is_loopback


def is_allowed_destination(family: int, address: Any) -> bool:
    """True if a socket of ``family`` may connect/send to ``address``: loopback IPs, AF_UNIX, netlink.

    A host name (other than ``localhost``) is refused without resolving it: resolving alone may send
    a DNS query off the machine.
    """
    if family in _LOCAL_FAMILIES:
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if not isinstance(address, tuple) or not address:
        return False
    return is_loopback_target(address[0])


def is_allowed_lookup(host: Any, own_hostname: str | None = None) -> bool:
    """True if resolving ``host`` sends no query off the machine: IP literals, localhost, our hostname."""
    if host is None or host in ("", b""):
        return True
    text = _text(host)
    if text is None:
        return False
    if _ip(text) is not None or text.lower() in _LOOPBACK_NAMES:
        return True  # a literal is parsed, not looked up; the connect to it is checked separately
    return own_hostname is not None and text.lower() == own_hostname.lower()


class NetworkGuard:
    """Wraps ``socket`` so that non-loopback destinations raise before any packet is sent.

    Violations are recorded (with the thread and call site) until :meth:`take_violations` collects them.
    ``install()`` patches for the whole session (``uninstall()`` restores); ``install(monkeypatch)`` patches
    through a ``MonkeyPatch`` (a guard of one test, stacked on whatever is installed now).
    """

    _SOCKET_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")
    _MODULE_FUNCTIONS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex")

    def __init__(self) -> None:
        self._violations: list[str] = []
        self._lock = threading.Lock()
        self._saved_methods: dict[str, tuple[bool, Any]] = {}
        self._saved_functions: dict[str, Any] = {}
        self._own_hostname: str | None = None
        self.installed = False

    def _refuse(self, what: str) -> None:
        frame = traceback.extract_stack(limit=4)[0]
        message = f"{what} (thread {threading.current_thread().name}, from {frame.filename}:{frame.lineno})"
        with self._lock:
            self._violations.append(message)
        raise ForbiddenNetworkAccess(f"test network guard: {what} is outside 127.0.0.0/8 and ::1")

    def check_destination(self, family: int, address: Any, operation: str) -> None:
        """Raise (and record) if ``address`` is not a loopback destination."""
        if not is_allowed_destination(family, address):
            self._refuse(f"{operation} to {address!r}")

    def check_lookup(self, host: Any, operation: str) -> None:
        """Raise (and record) if resolving ``host`` could send a DNS query."""
        if not is_allowed_lookup(host, self._own_hostname):
            self._refuse(f"{operation}({host!r})")

    def take_violations(self) -> list[str]:
        """The violations recorded since the last call (and forget them)."""
        with self._lock:
            taken, self._violations = self._violations, []
        return taken

    def install(self, monkeypatch: pytest.MonkeyPatch | None = None) -> NetworkGuard:
        """Patch ``socket.socket`` methods and the module's resolver functions (idempotent)."""
        if self.installed:
            return self
        self._own_hostname = socket.gethostname()
        guard = self
        originals = {name: getattr(socket.socket, name) for name in self._SOCKET_METHODS}

        def connect(sock: socket.socket, address: Any) -> None:
            guard.check_destination(sock.family, address, "connect")
            return originals["connect"](sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check_destination(sock.family, address, "connect_ex")
            return originals["connect_ex"](sock, address)

        def sendto(sock: socket.socket, data: Any, *args: Any) -> int:
            # sendto(data, address) or sendto(data, flags, address)
            guard.check_destination(sock.family, args[-1] if args else None, "sendto")
            return originals["sendto"](sock, data, *args)

        def sendmsg(sock: socket.socket, buffers: Any, *args: Any) -> int:
            # sendmsg(buffers[, ancdata[, flags[, address]]]): only an explicit address can leave loopback
            if len(args) >= 3 and args[2] is not None:
                guard.check_destination(sock.family, args[2], "sendmsg")
            return originals["sendmsg"](sock, buffers, *args)

        wrappers = {"connect": connect, "connect_ex": connect_ex, "sendto": sendto, "sendmsg": sendmsg}
        for name, wrapper in wrappers.items():
            if monkeypatch is not None:
                monkeypatch.setattr(socket.socket, name, wrapper)
            else:
                self._saved_methods[name] = (name in vars(socket.socket), vars(socket.socket).get(name))
                setattr(socket.socket, name, wrapper)

        for name in self._MODULE_FUNCTIONS:
            original = getattr(socket, name)

            def resolver(
                host: Any,
                *args: Any,
                _original: Callable[..., Any] = original,
                _name: str = name,
                **kwargs: Any,
            ) -> Any:
                guard.check_lookup(host, _name)
                return _original(host, *args, **kwargs)

            if monkeypatch is not None:
                monkeypatch.setattr(socket, name, resolver)
            else:
                self._saved_functions[name] = original
                setattr(socket, name, resolver)
        self.installed = monkeypatch is None
        return self

    def uninstall(self) -> None:
        """Restore the original ``socket`` functions (after a session-wide ``install()``)."""
        if not self.installed:
            return
        for name, (was_own, original) in self._saved_methods.items():
            if was_own:
                setattr(socket.socket, name, original)
            else:
                delattr(socket.socket, name)  # back to the inherited C method
        for name, original in self._saved_functions.items():
            setattr(socket, name, original)
        self._saved_methods.clear()
        self._saved_functions.clear()
        self.installed = False


def install_socket_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in for the kernel in the guard's own tests: non-loopback connects, sends and lookups are
    recorded and refused here (never performed), loopback ones go to the functions installed before.

    Install it *before* a fresh ``NetworkGuard().install(monkeypatch)``: an empty returned list then proves
    the guard stopped every non-loopback attempt before the socket call, and a broken guard still sends
    nothing.
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
        if not is_allowed_lookup(host):
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


NETWORK_GUARD = NetworkGuard()


def pytest_configure(config: pytest.Config) -> None:
    # Installed before collection so that imports at collection time are guarded too.
    NETWORK_GUARD.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    NETWORK_GUARD.uninstall()


@pytest.fixture(autouse=True)
def network_guard() -> Iterator[NetworkGuard]:
    """Fails the test if anything in this process tried to leave loopback while it ran.

    Tests that expect a refusal call ``network_guard.take_violations()`` to claim it.
    """
    yield NETWORK_GUARD
    violations = NETWORK_GUARD.take_violations()
    if violations:
        pytest.fail("non-loopback network access attempted:\n  " + "\n  ".join(violations), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Attempts outside any test (collection, session fixtures, stray threads) still fail the run.
    violations = NETWORK_GUARD.take_violations()
    if violations:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "non-loopback network access attempted outside a test:\n  " + "\n  ".join(violations)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
