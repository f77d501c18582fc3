"""The SSRF guard's address rules: which addresses an image fetch may connect to (pure logic, no network)."""

from __future__ import annotations

import ipaddress

import pytest

from worker.config import ConfigError, load_settings
from worker.contracts.rejections import Reason, RejectedError
from worker.images.ssrf import AddressPolicy, parse_ip_literal, resolve_and_vet, system_resolver

NO_ALLOW = AddressPolicy.from_cidrs([])


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "this network"),
        ("0.1.2.3", "this network"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("fd00:ec2::254", "metadata"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a00:1", "10.0.0.1"),
        ("2002:a00:1::1", "10.0.0.1"),
        ("::10.0.0.1", "reserved"),
    ],
)
def test_special_purpose_addresses_are_blocked_with_a_named_reason(address: str, why: str) -> None:
    reason = NO_ALLOW.blocked_because(ipaddress.ip_address(address))
    assert reason is not None
    assert why in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert NO_ALLOW.blocked_because(ipaddress.ip_address(address)) is None


def test_allow_list_exempts_its_networks_only() -> None:
    policy = AddressPolicy.from_cidrs(["127.0.0.0/8", "10.1.0.0/16"])
    assert policy.blocked_because(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.blocked_because(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.blocked_because(ipaddress.ip_address("10.1.2.3")) is None
    assert policy.blocked_because(ipaddress.ip_address("10.2.0.1")) is not None
    assert policy.blocked_because(ipaddress.ip_address("::1")) is not None
    assert policy.blocked_because(ipaddress.ip_address("169.254.169.254")) is not None


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.0.0.5.", "10.0.0.5"),
        ("017700000001", "127.0.0.1"),
        ("[::1]", "::1"),
        ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_ip_literals_in_every_legacy_form_are_read_as_addresses(host: str, address: str) -> None:
    assert parse_ip_literal(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["images.example", "1.example", "xn--bcher-kva.example"])
def test_names_are_not_literals(host: str) -> None:
    assert parse_ip_literal(host) is None


@pytest.mark.parametrize(
    "host", ["999.0.0.1", "1.2.3.4.5", "09.0.0.1", "example.1", "4294967296", "[fe80::1%25eth0]"]
)
def test_malformed_numeric_hosts_are_refused_not_resolved(host: str) -> None:
    with pytest.raises(RejectedError) as caught:
        parse_ip_literal(host)
    assert caught.value.rejection.reason is Reason.IMAGE_BLOCKED_ADDRESS


def test_a_literal_host_never_reaches_the_resolver() -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.216.34"]

    with pytest.raises(RejectedError) as caught:
        resolve_and_vet("2130706433", 80, NO_ALLOW, resolver)
    assert caught.value.rejection.reason is Reason.IMAGE_BLOCKED_ADDRESS
    assert "loopback" in caught.value.rejection.message
    assert calls == []


def test_one_blocked_record_refuses_the_whole_name() -> None:
    with pytest.raises(RejectedError) as caught:
        resolve_and_vet("mixed.test", 443, NO_ALLOW, lambda host, port: ["93.184.216.34", "10.0.0.5"])
    assert caught.value.rejection.reason is Reason.IMAGE_BLOCKED_ADDRESS
    assert "10.0.0.5" in caught.value.rejection.message


def test_unresolvable_and_empty_names_fail_the_fetch() -> None:
    def gai_error(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    for resolver in (gai_error, lambda host, port: []):
        with pytest.raises(RejectedError) as caught:
            resolve_and_vet("nowhere.test", 80, NO_ALLOW, resolver)
        assert caught.value.rejection.reason is Reason.IMAGE_FETCH_FAILED


def test_public_name_resolves_to_its_vetted_addresses_in_order() -> None:
    vetted = resolve_and_vet("cdn.test", 443, NO_ALLOW, lambda host, port: ["93.184.216.34", "2606:4700::1"])
    assert [str(a) for a in vetted] == ["93.184.216.34", "2606:4700::1"]


def test_system_resolver_returns_ip_strings_for_localhost() -> None:
    addresses = system_resolver("localhost", 80)
    assert addresses
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)


def test_a_bad_allow_list_entry_fails_at_configuration_time() -> None:
    with pytest.raises(ConfigError, match="not a CIDR network"):
        load_settings(None, **{"image_fetch.allow_networks": ["10.0.0.0/8", "intranet"]})
