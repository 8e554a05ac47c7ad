"""Builders for well-formed test packets (wireguard-go `tuntest.Ping` analogue).

Every builder returns a complete IP packet with a correct IPv4 header
checksum and a correct UDP / ICMP / ICMPv6 checksum: the same packets are
later written to real TUN devices, where the kernel verifies them.

Addresses may be given as strings or `ipaddress` objects. To keep tests off
real networks, only 198.18.0.0/16 and 198.19.0.0/16 (RFC 2544 benchmarking)
and fd00::/8 (ULA) are accepted, plus the OSPF multicast groups 224.0.0.5,
224.0.0.6, ff02::5 and ff02::6 as destinations; anything else raises
ValueError.
"""

from __future__ import annotations

import ipaddress
import struct

from l3ptp.ipc.constants import IP_VERSION_4, IP_VERSION_6, IPV4_MIN_HEADER

__all__ = [
    "MULTICAST_DESTINATIONS",
    "TEST_NETWORKS",
    "internet_checksum",
    "ipv4",
    "ipv4_icmp_echo",
    "ipv4_tcp",
    "ipv4_udp",
    "ipv6",
    "ipv6_icmp_echo",
    "ipv6_tcp",
    "ipv6_udp",
]

TEST_NETWORKS = (
    ipaddress.ip_network("198.18.0.0/16"),
    ipaddress.ip_network("198.19.0.0/16"),
    ipaddress.ip_network("fd00::/8"),
)
MULTICAST_DESTINATIONS = frozenset(
    ipaddress.ip_address(a) for a in ("224.0.0.5", "224.0.0.6", "ff02::5", "ff02::6")
)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
TCP_ACK = 0x10
PROTO_ICMPV6 = 58
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
DEFAULT_SPORT = 40000
DEFAULT_DPORT = 40001
_IPV4_DF = 0x4000
_UDP_HEADER = struct.Struct("!HHHH")
_ICMP_ECHO = struct.Struct("!BBHHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_FIXED = struct.Struct("!IHBB16s16s")

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum; 0 when run over data that includes a correct one."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _address(value: Address, version: int, *, destination: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(value)
    if addr.version != version:
        raise ValueError(f"{addr} is not an IPv{version} address")
    if destination and addr in MULTICAST_DESTINATIONS:
        return addr
    if not any(addr in net for net in TEST_NETWORKS):
        raise ValueError(f"{addr} is outside the test networks {[str(n) for n in TEST_NETWORKS]}")
    return addr


def ipv4(
    src: Address,
    dst: Address,
    proto: int,
    body: bytes,
    *,
    ttl: int = 64,
    df: bool = False,
    ident: int = 0,
    options: bytes = b"",
) -> bytes:
    """IPv4 header (+ `options`, padded to 4 bytes) + `body`, checksum set."""
    source = _address(src, IP_VERSION_4, destination=False)
    dest = _address(dst, IP_VERSION_4, destination=True)
    options += b"\0" * (-len(options) % 4)
    header_len = IPV4_MIN_HEADER + len(options)
    fields = (
        (IP_VERSION_4 << 4) | (header_len // 4),
        0,
        header_len + len(body),
        ident,
        _IPV4_DF if df else 0,
        ttl,
        proto,
    )
    unsummed = _IPV4_HEADER.pack(*fields, 0, source.packed, dest.packed) + options
    header = _IPV4_HEADER.pack(*fields, internet_checksum(unsummed), source.packed, dest.packed)
    return header + options + body


def ipv6(src: Address, dst: Address, next_header: int, body: bytes, *, hop_limit: int = 64) -> bytes:
    """IPv6 fixed header + `body` (traffic class and flow label 0)."""
    source = _address(src, IP_VERSION_6, destination=False)
    dest = _address(dst, IP_VERSION_6, destination=True)
    return _IPV6_FIXED.pack(IP_VERSION_6 << 28, len(body), next_header, hop_limit, source.packed, dest.packed) + body


def _pseudo_v4(src: Address, dst: Address, proto: int, length: int) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!xBH", proto, length)


def _pseudo_v6(src: Address, dst: Address, next_header: int, length: int) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!I3xB", length, next_header)


def _udp(pseudo_header_for, src: Address, dst: Address, payload: bytes, sport: int, dport: int) -> bytes:
    length = _UDP_HEADER.size + len(payload)
    unsummed = _UDP_HEADER.pack(sport, dport, length, 0) + payload
    csum = internet_checksum(pseudo_header_for(src, dst, PROTO_UDP, length) + unsummed)
    return _UDP_HEADER.pack(sport, dport, length, csum or 0xFFFF) + payload


def ipv4_udp(
    src: Address,
    dst: Address,
    payload: bytes = b"",
    *,
    ttl: int = 64,
    df: bool = False,
    sport: int = DEFAULT_SPORT,
    dport: int = DEFAULT_DPORT,
) -> bytes:
    """A complete IPv4/UDP packet."""
    body = _udp(_pseudo_v4, src, dst, payload, sport, dport)
    return ipv4(src, dst, PROTO_UDP, body, ttl=ttl, df=df)


def ipv4_icmp_echo(
    src: Address, dst: Address, ident: int = 1, seq: int = 1, payload: bytes = b"", *, ttl: int = 64
) -> bytes:
    """A complete IPv4 ICMP echo request."""
    unsummed = _ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    body = _ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, internet_checksum(unsummed), ident, seq) + payload
    return ipv4(src, dst, PROTO_ICMP, body, ttl=ttl)


def ipv6_udp(
    src: Address,
    dst: Address,
    payload: bytes = b"",
    *,
    hop_limit: int = 64,
    sport: int = DEFAULT_SPORT,
    dport: int = DEFAULT_DPORT,
) -> bytes:
    """A complete IPv6/UDP packet (UDP checksum is mandatory over IPv6)."""
    body = _udp(_pseudo_v6, src, dst, payload, sport, dport)
    return ipv6(src, dst, PROTO_UDP, body, hop_limit=hop_limit)


def ipv6_icmp_echo(
    src: Address, dst: Address, ident: int = 1, seq: int = 1, payload: bytes = b"", *, hop_limit: int = 64
) -> bytes:
    """A complete ICMPv6 echo request (checksum over the IPv6 pseudo-header)."""
    unsummed = _ICMP_ECHO.pack(ICMPV6_ECHO_REQUEST, 0, 0, ident, seq) + payload
    csum = internet_checksum(_pseudo_v6(src, dst, PROTO_ICMPV6, len(unsummed)) + unsummed)
    body = _ICMP_ECHO.pack(ICMPV6_ECHO_REQUEST, 0, csum, ident, seq) + payload
    return ipv6(src, dst, PROTO_ICMPV6, body, hop_limit=hop_limit)


def _tcp(pseudo_header_for, src: Address, dst: Address, payload: bytes, sport: int, dport: int, seq: int, ack: int,
         flags: int, window: int, options: bytes) -> bytes:
    options += b"\1" * (-len(options) % 4)  # NOP padding
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0) + options
    csum = internet_checksum(pseudo_header_for(src, dst, PROTO_TCP, len(header) + len(payload)) + header + payload)
    return header[:16] + csum.to_bytes(2, "big") + header[18:] + payload


def ipv4_tcp(
    src: Address, dst: Address, payload: bytes = b"", *, seq: int = 1000, ack: int = 1, flags: int = TCP_ACK,
    window: int = 501, options: bytes = b"", ident: int = 0, df: bool = True, ttl: int = 64,
    ip_options: bytes = b"", sport: int = DEFAULT_SPORT, dport: int = DEFAULT_DPORT,
) -> bytes:
    """A complete IPv4/TCP segment (TCP `options` NOP-padded to 4 bytes; `ip_options` zero-padded)."""
    body = _tcp(_pseudo_v4, src, dst, payload, sport, dport, seq, ack, flags, window, options)
    return ipv4(src, dst, PROTO_TCP, body, ttl=ttl, df=df, ident=ident, options=ip_options)


def ipv6_tcp(
    src: Address, dst: Address, payload: bytes = b"", *, seq: int = 1000, ack: int = 1, flags: int = TCP_ACK,
    window: int = 501, options: bytes = b"", hop_limit: int = 64, sport: int = DEFAULT_SPORT,
    dport: int = DEFAULT_DPORT,
) -> bytes:
    """A complete IPv6/TCP segment."""
    body = _tcp(_pseudo_v6, src, dst, payload, sport, dport, seq, ack, flags, window, options)
    return ipv6(src, dst, PROTO_TCP, body, hop_limit=hop_limit)
