"""Shared pytest fixtures: the embedded broker and Redis, per-test settings, and the network guard.

- ``services`` (session): one tansu broker and one Redis server on free 127.0.0.1 ports for the whole
  run, always stopped at the end; their log directory is printed in the summary (with log tails when
  a test failed).
- ``make_settings(**overrides)`` (function): ``Settings`` pointed at ``services`` with topic names, a
  consumer group and a Redis key prefix unique to the test, and fast group timeouts.
- the network guard (autouse): any attempt to connect, send to or resolve a destination outside
  127.0.0.0/8 and ::1 raises :class:`ForbiddenNetworkAccess` *before* the real call, so no packet
  leaves the machine, and fails the test at teardown even if the code under test swallowed the error.
  It covers Python sockets of this process (kafka-python, redis-py, urllib3, aiohttp, asyncio), not
  subprocesses or C extensions with their own sockets (Ray's gRPC core).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings, load_settings
from worker.dev.services import EmbeddedServices

# Fixture modules written by other parts of the project; loaded when present.
pytest_plugins = ["pytester"] + [
    name
    for name in ("tests.fixtures.tiny_model", "tests.fixtures.ray_cluster", "tests.fixtures.multinode")
    if importlib.util.find_spec(name) is not None
]

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- network guard ----------------------------------------------------------------------------------


class ForbiddenNetworkAccess(PermissionError):
    """A test tried to reach (or resolve) a destination outside 127.0.0.0/8 and ::1."""


# Names that resolve from /etc/hosts without a DNS query.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
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
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def is_allowed_lookup(host: Any, own_hostname: str | None = None) -> bool:
    """True if resolving ``host`` sends no query off the machine: IP literals, localhost, our hostname."""
    if host is None or host in ("", b""):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if _ip(host) is not None or host.lower() in _LOOPBACK_NAMES:
        return True  # a literal is parsed, not looked up; the connect to it is checked separately
    return own_hostname is not None and host.lower() == own_hostname.lower()


class NetworkGuard:
    """Wraps ``socket`` so that non-loopback destinations raise before any packet is sent.

    Violations are recorded (with the thread and call site) until :meth:`take_violations` collects
    them; the autouse fixture fails the running test when it finds any.
    """

    _SOCKET_METHODS = ("connect", "connect_ex", "sendto")
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

    def install(self) -> None:
        """Patch ``socket.socket`` methods and the module's resolver functions (idempotent)."""
        if self.installed:
            return
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

        for name, wrapper in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto)):
            self._saved_methods[name] = (name in vars(socket.socket), vars(socket.socket).get(name))
            setattr(socket.socket, name, wrapper)

        for name in self._MODULE_FUNCTIONS:
            original = getattr(socket, name)
            self._saved_functions[name] = original

            def resolver(
                host: Any,
                *args: Any,
                _original: Callable[..., Any] = original,
                _name: str = name,
                **kwargs: Any,
            ) -> Any:
                guard.check_lookup(host, _name)
                return _original(host, *args, **kwargs)

            setattr(socket, name, resolver)
        self.installed = True

    def uninstall(self) -> None:
        """Restore the original ``socket`` functions."""
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


# -- embedded services ------------------------------------------------------------------------------

_started_services: list[EmbeddedServices] = []


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServices]:
    """The tansu broker and Redis on free 127.0.0.1 ports, shared by the session, stopped at its end."""
    embedded = EmbeddedServices(tmp_path_factory.mktemp("services"))
    _started_services.append(embedded)
    embedded.start()  # raises ServicesError with the log's tail on failure
    try:
        yield embedded
    finally:
        embedded.stop()


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ["<no log>"]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for embedded in _started_services:
        seconds = f"{embedded.startup_seconds:.2f} s" if embedded.startup_seconds is not None else "failed"
        terminalreporter.write_line(
            f"embedded services: start-up {seconds}; logs kept in {embedded.state_dir}"
        )
        if exitstatus != 0:
            for log_path in (embedded.broker_log, embedded.redis_log):
                terminalreporter.write_line(f"--- tail of {log_path}")
                for line in _tail(log_path):
                    terminalreporter.write_line(line)


class SettingsFactory:
    """Builds ``Settings`` for one test: ``factory(**overrides)`` with ``load_settings``-style keys
    (``kafka__group_id="g"``). Every call in a test shares the same topics, group and key prefix."""

    def __init__(self, services: EmbeddedServices, suffix: str) -> None:
        self.suffix = suffix
        self.base: dict[str, Any] = {
            "kafka__bootstrap_servers": [services.kafka_bootstrap],
            "kafka__group_id": f"mw-test-{suffix}",
            # tansu holds a group join for about session_timeout/2: keep rebalances short in tests.
            "kafka__session_timeout_ms": 3000,
            "kafka__heartbeat_interval_ms": 1000,
            "topics__events": f"chat.events.{suffix}",
            "topics__flagged": f"moderation.flagged.{suffix}",
            "topics__verdicts": f"moderation.verdicts.{suffix}",
            "topics__dlq": f"moderation.dlq.{suffix}",
            "topics__review": f"moderation.review.{suffix}",
            "redis__url": services.redis_url,
            # One Redis serves the session: a per-test prefix keeps cached verdicts from leaking across tests.
            "redis__key_prefix": f"mw:test:{suffix}:",
        }

    def __call__(self, **overrides: Any) -> Settings:
        return load_settings(None, **{**self.base, **overrides})


KAFKA_CLIENTS = ["kafka-python", "confluent-kafka"]


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """``kafka.client`` for a delivery test: a test that asks for it runs once per Kafka client library."""
    return request.param


@pytest.fixture
def make_settings(services: EmbeddedServices, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """``make_settings(**overrides) -> Settings`` pointed at the embedded services, unique per test.

    ``MW_*`` variables from the developer's shell (e.g. after ``dev-services up``) are removed for the
    test, so every run sees the same configuration.
    """
    for key in list(os.environ):
        if key == "MW_CONFIG" or (key.startswith("MW_") and "__" in key):
            monkeypatch.delenv(key)
    return SettingsFactory(services, uuid.uuid4().hex[:12])
