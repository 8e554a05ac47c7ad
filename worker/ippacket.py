"""Validation of inner IP packets, in both directions of the data path.

`check_ip_untrusted` is the single gate every IP packet passes before it is
sent to the peer (read from TUN, `Direction.FROM_TUN`) or written to TUN
(received from the peer, `Direction.FROM_PEER`). It returns the `DropReason`
to count, or None to forward; it never raises on any input bytes.

Checks, in order (the first failure wins):

1. empty packet                      -> ``tun_bad_packet`` / ``dgram_bad_ip``
2. version nibble not 4 or 6         -> ``*_bad_ip_version``
3. longer than the MTU               -> ``tun_oversize`` / ``dgram_oversize``
4. IPv4: at least 20 bytes, IHL >= 5, IHL*4 <= length, total length ==
   packet length; IPv6: at least 40 bytes, payload length != 0 and
   payload length + 40 == packet length (so jumbograms, which carry 0
   there, are rejected)           -> ``tun_bad_packet`` / ``dgram_bad_ip``
5. source address not in allowed_src -> ``*_src_not_allowed``

Deliberately not checked:

* The IPv4 header checksum. The QUIC AEAD already protects every packet
  end to end, and the kernel's ``ip_rcv`` verifies the checksum again when
  the packet is written to TUN; doing it in Python would cost about 1 us
  per packet for no gain.
* The destination address. Routing decides what reaches TUN, and routing
  protocols need multicast destinations (224.0.0.5/224.0.0.6,
  ff02::5/ff02::6 for OSPF); such packets pass as long as the source is
  allowed.
* Anything beyond the fixed header (options, extension headers, L4).

Hot path: one precompiled `struct.Struct` per family, no copies, no
allocation on the accept path beyond the source-address int.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable

from l3ptp.ipc.constants import IP_VERSION_4, IP_VERSION_6, IPV4_MIN_HEADER, IPV6_HEADER
from l3ptp.ipc.counters import DropReason

__all__ = ["Direction", "PrefixSet", "check_ip_untrusted"]

_V4_BITS = 32
_V6_BITS = 128
_V6_HALF_SHIFT = 64
_IHL_MASK = 0x0F
_IHL_UNIT = 4
_IPV4_MIN_IHL = IPV4_MIN_HEADER // _IHL_UNIT

#: version/IHL, total length, source (skips TOS, id, frag, ttl, proto, csum).
_IPV4 = struct.Struct("!BxH8xI")
#: payload length, source address as two 64-bit halves.
_IPV6 = struct.Struct("!4xH2xQQ")
_ipv4_unpack = _IPV4.unpack_from
_ipv6_unpack = _IPV6.unpack_from

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class PrefixSet:
    """A set of IPv4 and IPv6 prefixes with fast source-address lookup.

    Networks are grouped by prefix length; each group is a set of masked
    network integers, so a lookup costs one mask-and-hash per distinct
    prefix length of that family. An empty set contains nothing; a /0
    contains every address of its family.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[_Network | str] = ()) -> None:
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        collected: list[_Network] = []
        for item in networks:
            net = item if isinstance(item, _NETWORK_TYPES) else ipaddress.ip_network(item)
            collected.append(net)
            groups = v4 if net.version == IP_VERSION_4 else v6
            groups.setdefault(net.prefixlen, set()).add(int(net.network_address))
        self._networks: tuple[_Network, ...] = tuple(collected)
        self._v4 = self._freeze(v4, _V4_BITS)
        self._v6 = self._freeze(v6, _V6_BITS)

    @staticmethod
    def _freeze(groups: dict[int, set[int]], bits: int) -> tuple[tuple[int, frozenset[int]], ...]:
        full = (1 << bits) - 1
        # Shortest prefixes first: broad allow-lists match on the first probe.
        return tuple(
            (full ^ ((1 << (bits - plen)) - 1), frozenset(nets))
            for plen, nets in sorted(groups.items())
        )

    @property
    def networks(self) -> tuple[_Network, ...]:
        """The networks this set was built from, in input order."""
        return self._networks

    def contains_v4(self, addr: bytes | memoryview | int) -> bool:
        """True if the IPv4 address (4 bytes, big-endian, or int) is covered."""
        if type(addr) is not int:
            addr = int.from_bytes(addr, "big")
        for mask, nets in self._v4:
            if addr & mask in nets:
                return True
        return False

    def contains_v6(self, addr: bytes | memoryview | int) -> bool:
        """True if the IPv6 address (16 bytes, big-endian, or int) is covered."""
        if type(addr) is not int:
            addr = int.from_bytes(addr, "big")
        for mask, nets in self._v6:
            if addr & mask in nets:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __repr__(self) -> str:
        return f"PrefixSet([{', '.join(repr(str(n)) for n in self._networks)}])"


class Direction(enum.Enum):
    """Which way a packet travels; selects ``tun_*`` or ``dgram_*`` reasons."""

    FROM_TUN = enum.auto()
    FROM_PEER = enum.auto()


# (bad packet, bad version, oversize, source not allowed) per direction.
_REASONS: dict[Direction, tuple[DropReason, DropReason, DropReason, DropReason]] = {
    Direction.FROM_TUN: (
        DropReason.TUN_BAD_PACKET,
        DropReason.TUN_BAD_IP_VERSION,
        DropReason.TUN_OVERSIZE,
        DropReason.TUN_SRC_NOT_ALLOWED,
    ),
    Direction.FROM_PEER: (
        DropReason.DGRAM_BAD_IP,
        DropReason.DGRAM_BAD_IP_VERSION,
        DropReason.DGRAM_OVERSIZE,
        DropReason.DGRAM_SRC_NOT_ALLOWED,
    ),
}


def check_ip_untrusted(
    packet: bytes | bytearray | memoryview,
    *,
    mtu: int,
    allowed_src: PrefixSet,
    direction: Direction,
) -> DropReason | None:
    """Return why `packet` must be dropped, or None to accept it.

    See the module docstring for the checks and their order. Never raises
    for any content of `packet` (a one-dimensional byte buffer).
    """
    size = len(packet)
    if not size:
        return _REASONS[direction][0]
    version = packet[0] >> 4
    if version == IP_VERSION_4:
        if size > mtu:
            return _REASONS[direction][2]
        if size < IPV4_MIN_HEADER:
            return _REASONS[direction][0]
        version_ihl, total_length, source = _ipv4_unpack(packet)
        ihl = version_ihl & _IHL_MASK
        if ihl < _IPV4_MIN_IHL or ihl * _IHL_UNIT > size or total_length != size:
            return _REASONS[direction][0]
        for mask, networks in allowed_src._v4:  # inlined contains_v4
            if source & mask in networks:
                return None
        return _REASONS[direction][3]
    if version == IP_VERSION_6:
        if size > mtu:
            return _REASONS[direction][2]
        if size < IPV6_HEADER:
            return _REASONS[direction][0]
        payload_length, source_high, source_low = _ipv6_unpack(packet)
        if not payload_length or payload_length + IPV6_HEADER != size:
            return _REASONS[direction][0]
        source = (source_high << _V6_HALF_SHIFT) | source_low
        for mask, networks in allowed_src._v6:  # inlined contains_v6
            if source & mask in networks:
                return None
        return _REASONS[direction][3]
    return _REASONS[direction][1]
