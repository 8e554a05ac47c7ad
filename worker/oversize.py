"""Packets too big for the tunnel: fragment or answer, like a router (pure).

A packet from the TUN larger than the session's packet limit is not queued
(it would stall the QUIC DATAGRAM queue). The interface MTU can be larger than
that limit (the peer accepted less than we asked for), and a silent drop is a
path-MTU black hole. So the worker does what a router on that hop would:

* IPv4 without DF (and without options): `fragment_v4` splits it into
  fragments that fit (RFC 791); the peer's kernel reassembles them.
* IPv4 with DF, and IPv6: `too_big` builds an ICMPv4 "fragmentation needed"
  or ICMPv6 "packet too big" carrying the limit, written back into the TUN as
  if it came from the peer's tunnel address (the next hop; a source that is
  one of our own addresses would be a martian to the kernel). The local stack
  and, through forwarding, hosts behind us then lower their path MTU.

Only for a well-formed packet from an allowed local source; never an ICMP
error about an ICMP error (RFC 1812, 4.3.2.7; RFC 4443, 2.4); the caller
rate-limits the errors and counts what it does.
"""

from __future__ import annotations

import struct

from l3ptp.ipc.constants import IP_VERSION_4, IP_VERSION_6

from .ippacket import PrefixSet
from .vnet import checksum, ones_sum

__all__ = ["fragment_v4", "too_big"]

_IPV4_HEADER = 20
_IPV6_HEADER = 40
_ICMP_HEADER = 8
_DF = 0x4000
_MF = 0x2000
_OFFSET_MASK = 0x1FFF
_PROTO_ICMP = 1
_PROTO_ICMPV6 = 58
#: ICMPv4 error types (destination unreachable, source quench, redirect, time exceeded, parameter problem).
_ICMPV4_ERRORS = frozenset({3, 4, 5, 11, 12})
#: An ICMPv4 error carries at most a 576-byte datagram (RFC 1812, 4.3.2.3); ICMPv6 fits in 1280 (RFC 4443, 2.4).
_ICMPV4_MAX = 576
_ICMPV6_MAX = 1280
_TTL = 64


def _checksum(data: bytes) -> int:
    """RFC 1071, the sum TUN offloads use too (`vnet.ones_sum`: the whole buffer as one integer mod 0xFFFF)."""
    return checksum(ones_sum(data))


def too_big(packet: bytes, mtu: int, allowed_src: PrefixSet, peer_v4: bytes | None,
            peer_v6: bytes | None) -> bytes | None:
    """The ICMP error to write back for an oversize `packet`, or None when none is due."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == IP_VERSION_4:
        return _too_big_v4(packet, mtu, allowed_src, peer_v4)
    if version == IP_VERSION_6:
        return _too_big_v6(packet, mtu, allowed_src, peer_v6)
    return None


def _too_big_v4(packet: bytes, mtu: int, allowed: PrefixSet, peer: bytes | None) -> bytes | None:
    if peer is None or len(packet) < _IPV4_HEADER:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total, frag, proto = struct.unpack_from("!2xH2xH1xB", packet)
    src = packet[12:16]
    if ihl < _IPV4_HEADER or total != len(packet) or ihl + 1 > total or not frag & _DF:
        return None
    if not allowed.contains_v4(src) or src[0] >= 224 or src == b"\0\0\0\0":
        return None
    if proto == _PROTO_ICMP and packet[ihl] in _ICMPV4_ERRORS:
        return None
    quoted = packet[:_ICMPV4_MAX - _IPV4_HEADER - _ICMP_HEADER]
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, _IPV4_HEADER + len(icmp), 0, 0, _TTL, _PROTO_ICMP, 0, peer, src)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def _too_big_v6(packet: bytes, mtu: int, allowed: PrefixSet, peer: bytes | None) -> bytes | None:
    if peer is None or len(packet) < _IPV6_HEADER:
        return None
    payload_length, next_header = struct.unpack_from("!4xHB", packet)
    src = packet[8:24]
    if not payload_length or payload_length + _IPV6_HEADER != len(packet):
        return None
    if not allowed.contains_v6(src) or src[0] == 0xFF:
        return None
    if src == bytes(16):
        return None
    if next_header == _PROTO_ICMPV6 and packet[_IPV6_HEADER] < 128:
        return None
    quoted = packet[:_ICMPV6_MAX - _IPV6_HEADER - _ICMP_HEADER]
    icmp = struct.pack("!BBHI", 2, 0, 0, mtu) + quoted
    pseudo = peer + src + struct.pack("!I3xB", len(icmp), _PROTO_ICMPV6)
    icmp = icmp[:2] + struct.pack("!H", _checksum(pseudo + icmp)) + icmp[4:]
    header = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), _PROTO_ICMPV6, _TTL, peer, src)
    return header + icmp


def fragment_v4(packet: bytes, limit: int, allowed_src: PrefixSet) -> list[bytes] | None:
    """`packet` (IPv4, DF clear, no options) as fragments of at most `limit` bytes, or None."""
    if len(packet) < _IPV4_HEADER or packet[0] != 0x45:  # version 4, no options
        return None
    total, frag = struct.unpack_from("!2xH2xH", packet)
    if total != len(packet) or frag & _DF or not allowed_src.contains_v4(packet[12:16]):
        return None
    step = (limit - _IPV4_HEADER) // 8 * 8
    if step <= 0:
        return None
    payload = memoryview(packet)[_IPV4_HEADER:]
    more, offset = frag & _MF, frag & _OFFSET_MASK
    fragments = []
    for start in range(0, len(payload), step):
        chunk = payload[start:start + step]
        last = start + step >= len(payload)
        flags = (0 if last else _MF) | (more if last else 0) | (offset + start // 8)
        header = bytearray(packet[:_IPV4_HEADER])
        struct.pack_into("!H", header, 2, _IPV4_HEADER + len(chunk))
        struct.pack_into("!H", header, 6, flags)
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, _checksum(bytes(header)))
        fragments.append(bytes(header) + chunk)
    return fragments
