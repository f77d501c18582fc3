"""SSRF guard: which IP addresses an image URL may make the worker connect to.

Image URLs come from untrusted chat events, so a URL could point the worker at its own loopback
services, the pod network, or the cloud metadata endpoint (169.254.169.254, fd00:ec2::254) and leak
credentials through error messages or timing. The guard therefore works on *addresses*, not names:

1. The URL's host is turned into IP addresses: IP literals are parsed locally (including the legacy
   decimal/octal/hex IPv4 forms such as ``2130706433`` or ``0177.0.0.1`` that browsers and
   ``inet_aton`` accept), everything else goes through the resolver exactly once.
2. Every resolved address must be publicly routable (or inside ``image_fetch.allow_networks``). If
   *any* record of a name is blocked, the whole name is refused: a name that mixes public and private
   records is an attack or a misconfiguration, and refusing it means the order of records cannot matter.
3. The fetcher then connects to the vetted address itself (never to the name), so there is no second
   DNS lookup an attacker could answer differently (DNS rebinding).

Blocked: unspecified/"this network" (0.0.0.0/8, ::), loopback (127/8, ::1), RFC 1918 private
networks, shared/CGNAT space (100.64/10), link-local (169.254/16 incl. the metadata address,
fe80::/10), IETF protocol assignments, documentation and benchmarking networks, multicast, the
reserved 240/4 block and broadcast, ULA (fc00::/7, incl. AWS' fd00:ec2::254), deprecated site-local
(fec0::/10), discard-only 100::/64, and anything else Python's ``ipaddress`` does not consider
globally reachable. IPv6 addresses that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the IPv4 address they lead to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from worker.contracts.rejections import Reason, RejectedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], list[str]]
"""Maps ``(host, port)`` to the IP address strings a connection may use (``socket.getaddrinfo`` shape)."""

# Why each special-purpose block is refused (IANA IPv4/IPv6 special-purpose address registries).
_BLOCKED_V4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified/'this network' address"),
    ("10.0.0.0/8", "a private (RFC 1918) address"),
    ("100.64.0.0/10", "a shared/CGNAT address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.169.254/32", "the cloud metadata address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private (RFC 1918) address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private (RFC 1918) address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_BLOCKED_V6: tuple[tuple[str, str], ...] = (
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("fd00:ec2::254/128", "the cloud metadata address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment-routing address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
    ("::/8", "a reserved address"),  # includes the deprecated IPv4-compatible ::a.b.c.d form
)
_BLOCKED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), why) for cidr, why in (*_BLOCKED_V4, *_BLOCKED_V6)
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to (IPv4-mapped, NAT64 well-known prefix, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes without DNS, or ``None`` for a name that needs resolving.

    Accepts ``[v6]`` and bare v6 literals, dotted-quad IPv4, and the legacy numeric IPv4 forms
    (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``) with WHATWG URL semantics, so a host
    the guard calls a name can never be one the socket layer would read as a number. A host that
    looks numeric but is not a valid address is refused (``image_blocked_address``) rather than resolved.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in bare:  # IPv6 zone ids only make sense for link-local targets, which are refused anyway
        raise RejectedError(Reason.IMAGE_BLOCKED_ADDRESS, f"image URL host {host!r} carries an IPv6 zone id")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    return _legacy_ipv4(bare)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """WHATWG "IPv4 parser": if the last label is numeric, the whole host must be an IPv4 number form."""
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]  # one trailing dot is allowed ("127.0.0.1.")
    if not labels or not _is_number_label(labels[-1]):
        return None
    try:
        numbers = [_parse_number_label(label) for label in labels]
    except ValueError:
        raise RejectedError(
            Reason.IMAGE_BLOCKED_ADDRESS, f"image URL host {host!r} is a malformed numeric IP address"
        ) from None
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise RejectedError(
            Reason.IMAGE_BLOCKED_ADDRESS, f"image URL host {host!r} is an out-of-range IP address"
        )
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _is_number_label(label: str) -> bool:
    if label[:2].lower() == "0x":
        return all(c in "0123456789abcdefABCDEF" for c in label[2:])
    return label != "" and label.isascii() and label.isdigit()


def _parse_number_label(label: str) -> int:
    if label == "":
        raise ValueError("empty label")
    if label[:2].lower() == "0x":
        return int(label, 16) if label[2:] else 0  # int() accepts the 0x prefix with base 16
    if len(label) > 1 and label[0] == "0":
        return int(label[1:], 8)
    return int(label, 10)


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system (``socket.getaddrinfo``), TCP addresses only, in order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses image fetches may connect to: public ones, plus the configured allow-list."""

    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> AddressPolicy:
        """Build from ``image_fetch.allow_networks`` (CIDR strings; a bad one is a configuration bug)."""
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs))

    def blocked_because(self, address: IPAddress) -> str | None:
        """Why connecting to ``address`` is refused (e.g. "a loopback address"), or ``None`` if allowed.

        An IPv6 address that embeds an IPv4 address is judged by the IPv4 address it leads to.
        """
        inner = embedded_ipv4(address)
        if self._allowed(address) or (inner is not None and self._allowed(inner)):
            return None
        if inner is not None:
            why = _special_purpose(inner)
            return None if why is None else f"an IPv6 address embedding {inner} ({why})"
        return _special_purpose(address)

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow_networks)

    def vet(self, host: str, addresses: Sequence[str]) -> list[IPAddress]:
        """Check every resolved address of ``host``; the usable addresses in resolver order.

        Raises ``RejectedError(image_blocked_address)`` if any address is blocked (see module doc),
        ``RejectedError(image_fetch_failed)`` if there is none.
        """
        if not addresses:
            raise RejectedError(Reason.IMAGE_FETCH_FAILED, f"image host {host!r} has no address")
        vetted: list[IPAddress] = []
        for text in addresses:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise RejectedError(
                    Reason.IMAGE_FETCH_FAILED, f"image host {host!r} resolved to a malformed address"
                ) from None
            why = self.blocked_because(address)
            if why is not None:
                raise RejectedError(
                    Reason.IMAGE_BLOCKED_ADDRESS, f"image host {host!r} resolves to {address}, {why}"
                )
            vetted.append(address)
        return vetted


def _special_purpose(address: IPAddress) -> str | None:
    for network, why in _BLOCKED:
        if address.version == network.version and address in network:
            return why
    if not address.is_global or address.is_multicast:
        return "not a globally routable address"
    return None


def resolve_and_vet(
    host: str, port: int, policy: AddressPolicy, resolver: Resolver | None = None
) -> list[IPAddress]:
    """The addresses a fetch of ``host:port`` may connect to, literal hosts parsed without DNS.

    Raises ``RejectedError`` with ``image_blocked_address`` or ``image_fetch_failed`` (unresolvable).
    """
    literal = parse_ip_literal(host)
    if literal is not None:
        return policy.vet(host, [str(literal)])
    resolve = resolver or system_resolver
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError; IDNA failures are UnicodeError
        raise RejectedError(
            Reason.IMAGE_FETCH_FAILED, f"image host {host!r} could not be resolved ({type(exc).__name__})"
        ) from None
    return policy.vet(host, addresses)
