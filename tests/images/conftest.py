"""Fixtures for the images tests: a local image server, an injectable resolver, and settings with small
timeouts and limits. The network guard (``tests.support.network_guard``, autouse everywhere) fails any test
here that tries to leave loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.images.image_server import ImageServer
from tests.images.tls import LocalPKI, make_pki
from worker.config import Settings

TEST_LIMIT_BYTES = 4096  # small, so oversized bodies stay small too


class FakeResolver:
    """An injected resolver: a fixed name → addresses table, recording every lookup."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        try:
            return list(self.table[host])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


@pytest.fixture
def resolver() -> FakeResolver:
    """Test names: images.test → 127.0.0.1; private, metadata, IPv6-loopback and mixed-record names."""
    return FakeResolver(
        {
            "images.test": ["127.0.0.1"],
            "other.test": ["127.0.0.1"],
            "private.test": ["10.0.0.5"],
            "metadata.test": ["169.254.169.254"],
            "metadata6.test": ["fd00:ec2::254"],
            "v6loop.test": ["::1"],
            "loop.test": ["127.0.0.1"],
            "loop2.test": ["127.0.0.2"],
            "mapped.test": ["::ffff:10.0.0.1"],
            "cgnat.test": ["100.64.0.1"],
            "mixed.test": ["93.184.216.34", "10.0.0.5"],
            "fallback.test": ["127.0.0.2", "127.0.0.1"],
        }
    )


@pytest.fixture
def image_settings() -> Callable[..., Settings]:
    """``image_settings(**image_fetch_fields)``: Settings with fast timeouts, a 4 KiB image limit and
    ``allow_networks=["127.0.0.0/8"]`` unless overridden."""

    def make(**image_fetch: Any) -> Settings:
        settings = Settings()
        settings.limits.max_image_bytes = TEST_LIMIT_BYTES
        fields: dict[str, Any] = {
            "connect_timeout_s": 1.0,
            "read_timeout_s": 0.4,
            "total_timeout_s": 1.5,
            "allow_networks": ["127.0.0.0/8"],
            **image_fetch,
        }
        for name, value in fields.items():
            setattr(settings.image_fetch, name, value)
        return settings

    return make


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    """The plain-HTTP image server on 127.0.0.1 (stopped after the test)."""
    with ImageServer(limit_bytes=TEST_LIMIT_BYTES) as server:
        yield server


@pytest.fixture(scope="session")
def local_pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    """A CA plus a certificate for ``images.test`` (not for ``other.test``)."""
    directory: Path = tmp_path_factory.mktemp("pki")
    return make_pki(directory, ["images.test"])


@pytest.fixture
def tls_image_server(local_pki: LocalPKI) -> Iterator[ImageServer]:
    """The image server over TLS with the ``images.test`` certificate."""
    with ImageServer(limit_bytes=TEST_LIMIT_BYTES, ssl_context=local_pki.server_context()) as server:
        yield server
