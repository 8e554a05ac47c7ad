"""Unit tests for l3ptp.worker.ippacket (and the tests.support.packets builders)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from l3ptp.ipc.constants import IPV4_MIN_HEADER, IPV6_HEADER, MTU_DEFAULT, MTU_MAX
from l3ptp.ipc.counters import DropReason
from l3ptp.worker.ippacket import Direction, PrefixSet, check_ip_untrusted
from tests.support import packets
from tests.support.packets import internet_checksum, ipv4, ipv4_icmp_echo, ipv4_udp, ipv6, ipv6_icmp_echo, ipv6_udp

ALLOWED = PrefixSet(
    [ipaddress.ip_network("198.19.1.0/24"), ipaddress.ip_network("fd00:1::/64"), ipaddress.ip_network("198.18.7.7/32")]
)
V4_OK = ipv4_udp("198.19.1.10", "198.19.2.20", b"payload")
V6_OK = ipv6_udp("fd00:1::10", "fd00:2::20", b"payload")

TUN = Direction.FROM_TUN
PEER = Direction.FROM_PEER
BAD = {TUN: DropReason.TUN_BAD_PACKET, PEER: DropReason.DGRAM_BAD_IP}
BAD_VERSION = {TUN: DropReason.TUN_BAD_IP_VERSION, PEER: DropReason.DGRAM_BAD_IP_VERSION}
OVERSIZE = {TUN: DropReason.TUN_OVERSIZE, PEER: DropReason.DGRAM_OVERSIZE}
SRC = {TUN: DropReason.TUN_SRC_NOT_ALLOWED, PEER: DropReason.DGRAM_SRC_NOT_ALLOWED}

both_directions = pytest.mark.parametrize("direction", [TUN, PEER])


def check(packet: bytes | bytearray | memoryview, direction: Direction, *, mtu: int = MTU_DEFAULT,
          allowed: PrefixSet = ALLOWED) -> DropReason | None:
    return check_ip_untrusted(packet, mtu=mtu, allowed_src=allowed, direction=direction)


def patched(packet: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(packet)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# -- PrefixSet -----------------------------------------------------------------


def test_prefix_set_empty_contains_nothing() -> None:
    empty = PrefixSet()
    assert not empty
    assert not empty.contains_v4(0)
    assert not empty.contains_v4(b"\xc6\x13\x01\x01")
    assert not empty.contains_v6(0)
    assert not empty.contains_v6(ipaddress.ip_address("fd00::1").packed)
    assert repr(empty) == "PrefixSet([])"


def test_prefix_set_mixed_families() -> None:
    assert ALLOWED
    assert ALLOWED.contains_v4(ipaddress.ip_address("198.19.1.0").packed)
    assert ALLOWED.contains_v4(ipaddress.ip_address("198.19.1.255").packed)
    assert not ALLOWED.contains_v4(ipaddress.ip_address("198.19.2.0").packed)
    assert not ALLOWED.contains_v4(ipaddress.ip_address("198.19.0.255").packed)
    assert ALLOWED.contains_v6(ipaddress.ip_address("fd00:1::ffff").packed)
    assert ALLOWED.contains_v6(ipaddress.ip_address("fd00:1:0:0:ffff:ffff:ffff:ffff").packed)
    assert not ALLOWED.contains_v6(ipaddress.ip_address("fd00:1:0:1::").packed)
    # Families never leak into each other: the IPv4 integer of 198.19.1.1 is
    # not an IPv6 member, and the IPv6 network integer is not an IPv4 member.
    assert not ALLOWED.contains_v6(int(ipaddress.ip_address("198.19.1.1")))
    assert not ALLOWED.contains_v4(int(ipaddress.ip_address("fd00:1::")) & 0xFFFFFFFF)


def test_prefix_set_accepts_int_bytes_and_memoryview() -> None:
    addr = ipaddress.ip_address("198.19.1.77")
    assert ALLOWED.contains_v4(int(addr))
    assert ALLOWED.contains_v4(addr.packed)
    assert ALLOWED.contains_v4(memoryview(V4_OK)[12:16])
    assert ALLOWED.contains_v6(memoryview(V6_OK)[8:24])


def test_prefix_set_host_routes() -> None:
    hosts = PrefixSet(["198.18.7.7/32", "fd00::7/128"])
    assert hosts.contains_v4(ipaddress.ip_address("198.18.7.7").packed)
    assert not hosts.contains_v4(ipaddress.ip_address("198.18.7.6").packed)
    assert not hosts.contains_v4(ipaddress.ip_address("198.18.7.8").packed)
    assert hosts.contains_v6(ipaddress.ip_address("fd00::7").packed)
    assert not hosts.contains_v6(ipaddress.ip_address("fd00::6").packed)
    assert not hosts.contains_v6(ipaddress.ip_address("fd00::8").packed)


def test_prefix_set_default_routes_cover_their_family_only() -> None:
    v4_all = PrefixSet([ipaddress.ip_network("0.0.0.0/0")])
    assert v4_all.contains_v4(0)
    assert v4_all.contains_v4(0xFFFFFFFF)
    assert v4_all.contains_v4(ipaddress.ip_address("198.18.0.1").packed)
    assert not v4_all.contains_v6(ipaddress.ip_address("fd00::1").packed)
    v6_all = PrefixSet(["::/0"])
    assert v6_all.contains_v6(0)
    assert v6_all.contains_v6((1 << 128) - 1)
    assert not v6_all.contains_v4(0)


def test_prefix_set_overlapping_and_duplicate_prefixes() -> None:
    s = PrefixSet(["198.18.0.0/16", "198.18.1.0/24", "198.18.0.0/16", "fd00::/8", "fd00:1::/32"])
    assert s.contains_v4(ipaddress.ip_address("198.18.200.1").packed)
    assert s.contains_v4(ipaddress.ip_address("198.18.1.1").packed)
    assert s.contains_v6(ipaddress.ip_address("fdff::1").packed)
    assert not s.contains_v6(ipaddress.ip_address("fe80::1").packed)


def test_prefix_set_every_prefix_length_boundary() -> None:
    base4 = int(ipaddress.ip_address("198.19.0.0"))
    for plen in range(16, 33):
        s = PrefixSet([ipaddress.ip_network((base4, plen))])
        size = 1 << (32 - plen)
        assert s.contains_v4(base4) and s.contains_v4(base4 + size - 1)
        assert not s.contains_v4(base4 + size) and not s.contains_v4(base4 - 1)
    base6 = int(ipaddress.ip_address("fd00::"))
    for plen in range(8, 129):
        s = PrefixSet([ipaddress.ip_network((base6, plen))])
        size = 1 << (128 - plen)
        assert s.contains_v6(base6) and s.contains_v6(base6 + size - 1)
        assert not s.contains_v6(base6 + size) and not s.contains_v6(base6 - 1)


def test_prefix_set_repr_and_networks() -> None:
    s = PrefixSet(["198.19.1.0/24", "fd00::/8"])
    assert repr(s) == "PrefixSet(['198.19.1.0/24', 'fd00::/8'])"
    assert s.networks == (ipaddress.ip_network("198.19.1.0/24"), ipaddress.ip_network("fd00::/8"))


def test_prefix_set_rejects_host_bits() -> None:
    with pytest.raises(ValueError):
        PrefixSet(["198.19.1.1/24"])


def test_prefix_set_accepts_generator() -> None:
    assert PrefixSet(ipaddress.ip_network(n) for n in ["198.19.0.0/16"]).contains_v4(
        ipaddress.ip_address("198.19.3.4").packed
    )


# -- check_ip_untrusted: accept ----------------------------------------------------


@both_directions
@pytest.mark.parametrize(
    "packet",
    [
        V4_OK,
        V6_OK,
        ipv4_icmp_echo("198.19.1.1", "198.19.2.2", 3, 4, b"ping"),
        ipv6_icmp_echo("fd00:1::1", "fd00:2::2", 3, 4, b"ping"),
        ipv4_udp("198.18.7.7", "198.19.2.2", df=True, ttl=1),
    ],
)
def test_valid_packets_are_accepted(packet: bytes, direction: Direction) -> None:
    assert check(packet, direction) is None
    assert check(bytearray(packet), direction) is None
    assert check(memoryview(packet), direction) is None


@both_directions
@pytest.mark.parametrize(
    "packet",
    [
        ipv4_udp("198.19.1.1", "224.0.0.5", b"ospf hello"),
        ipv4_udp("198.19.1.1", "224.0.0.6", b"ospf dr"),
        ipv6_udp("fd00:1::1", "ff02::5", b"ospf hello"),
        ipv6_udp("fd00:1::1", "ff02::6", b"ospf dr"),
        ipv6_icmp_echo("fd00:1::1", "ff02::5"),
    ],
)
def test_multicast_destinations_are_accepted(packet: bytes, direction: Direction) -> None:
    assert check(packet, direction) is None


@both_directions
@pytest.mark.parametrize(
    "packet",
    [
        ipv4_udp("198.19.2.1", "224.0.0.5", b"ospf hello"),
        ipv4_udp("198.19.2.1", "224.0.0.6"),
        ipv6_udp("fd00:2::1", "ff02::5", b"ospf hello"),
        ipv6_udp("fd00:2::1", "ff02::6"),
    ],
)
def test_multicast_destination_still_needs_allowed_source(packet: bytes, direction: Direction) -> None:
    assert check(packet, direction) is SRC[direction]


@both_directions
def test_ipv4_options_are_accepted(direction: Direction) -> None:
    packet = ipv4("198.19.1.1", "198.19.2.2", packets.PROTO_UDP, b"\0" * 8, options=b"\x94\x04\0\0")  # router alert
    assert packet[0] == 0x46
    assert check(packet, direction) is None
    max_options = ipv4("198.19.1.1", "198.19.2.2", packets.PROTO_UDP, b"", options=b"\x01" * 40)  # IHL 15
    assert max_options[0] == 0x4F
    assert check(max_options, direction) is None


@both_directions
def test_ipv4_header_checksum_is_not_verified(direction: Direction) -> None:
    corrupt = patched(V4_OK, 10, "!H", 0xDEAD)
    assert internet_checksum(corrupt[:IPV4_MIN_HEADER]) != 0
    assert check(corrupt, direction) is None


@both_directions
def test_bare_ipv4_header_is_accepted(direction: Direction) -> None:
    assert check(ipv4("198.19.1.1", "198.19.2.2", 59, b""), direction) is None


@both_directions
def test_packet_of_exactly_mtu_is_accepted(direction: Direction) -> None:
    v4 = ipv4_udp("198.19.1.1", "198.19.2.2", b"\0" * (MTU_DEFAULT - IPV4_MIN_HEADER - 8))
    v6 = ipv6_udp("fd00:1::1", "fd00:2::2", b"\0" * (MTU_DEFAULT - IPV6_HEADER - 8))
    assert len(v4) == len(v6) == MTU_DEFAULT
    assert check(v4, direction) is None
    assert check(v6, direction) is None


# -- check_ip_untrusted: reject ------------------------------------------------


@both_directions
def test_empty_packet_is_bad(direction: Direction) -> None:
    assert check(b"", direction) is BAD[direction]
    assert check(memoryview(b""), direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize("first", [0x00, 0x15, 0x35, 0x55, 0x75, 0xF0, 0xFF])
def test_unsupported_version_nibble(first: int, direction: Direction) -> None:
    assert check(bytes([first]) + V4_OK[1:], direction) is BAD_VERSION[direction]
    assert check(bytes([first]), direction) is BAD_VERSION[direction]


@both_directions
def test_version_checked_before_size(direction: Direction) -> None:
    huge = b"\x55" * (MTU_MAX + 1)
    assert check(huge, direction, mtu=MTU_DEFAULT) is BAD_VERSION[direction]


@both_directions
@pytest.mark.parametrize("packet", [V4_OK, V6_OK])
def test_oversize(packet: bytes, direction: Direction) -> None:
    assert check(packet, direction, mtu=len(packet) - 1) is OVERSIZE[direction]
    assert check(packet, direction, mtu=len(packet)) is None


@both_directions
def test_oversize_checked_before_structure_and_source(direction: Direction) -> None:
    foreign = ipv4_udp("198.19.9.9", "198.19.2.2", b"\0" * 100)
    assert check(foreign, direction, mtu=64) is OVERSIZE[direction]
    assert check(patched(foreign, 2, "!H", 1), direction, mtu=64) is OVERSIZE[direction]


@both_directions
@pytest.mark.parametrize("size", range(1, IPV4_MIN_HEADER))
def test_short_ipv4(size: int, direction: Direction) -> None:
    assert check(V4_OK[:size], direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_ihl_below_5(ihl: int, direction: Direction) -> None:
    assert check(bytes([0x40 | ihl]) + V4_OK[1:], direction) is BAD[direction]


@both_directions
def test_ipv4_ihl_beyond_packet(direction: Direction) -> None:
    packet = ipv4("198.19.1.1", "198.19.2.2", 59, b"\0" * 8)  # 28 bytes
    assert check(bytes([0x47]) + packet[1:], direction) is None  # 28 bytes of header: fits
    assert check(bytes([0x48]) + packet[1:], direction) is BAD[direction]  # 32 > 28
    assert check(bytes([0x4F]) + packet[1:], direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize("delta", [-len(V4_OK), -1, 1, 1000])
def test_ipv4_total_length_mismatch(delta: int, direction: Direction) -> None:
    assert check(patched(V4_OK, 2, "!H", len(V4_OK) + delta), direction) is BAD[direction]


@both_directions
def test_ipv4_truncated_or_padded(direction: Direction) -> None:
    assert check(V4_OK[:-1], direction) is BAD[direction]
    assert check(V4_OK + b"\0", direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize("size", range(1, IPV6_HEADER))
def test_short_ipv6(size: int, direction: Direction) -> None:
    assert check(V6_OK[:size], direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_ipv6_payload_length_mismatch(delta: int, direction: Direction) -> None:
    payload_length = len(V6_OK) - IPV6_HEADER + delta
    assert check(patched(V6_OK, 4, "!H", payload_length), direction) is BAD[direction]


@both_directions
def test_ipv6_truncated_or_padded(direction: Direction) -> None:
    assert check(V6_OK[:-1], direction) is BAD[direction]
    assert check(V6_OK + b"\0", direction) is BAD[direction]


@both_directions
def test_ipv6_zero_payload_length_is_rejected(direction: Direction) -> None:
    jumbo_like = patched(V6_OK, 4, "!H", 0)
    assert check(jumbo_like, direction, mtu=MTU_MAX) is BAD[direction]
    header_only = ipv6("fd00:1::1", "fd00:2::2", 59, b"")
    assert len(header_only) == IPV6_HEADER
    assert check(header_only, direction) is BAD[direction]


@both_directions
@pytest.mark.parametrize(
    "packet",
    [
        ipv4_udp("198.19.2.1", "198.19.1.1"),
        ipv4_udp("198.18.7.6", "198.19.1.1"),
        ipv4_icmp_echo("198.18.0.1", "198.19.1.1"),
        ipv6_udp("fd00:2::1", "fd00:1::1"),
        ipv6_icmp_echo("fd00:1:0:1::1", "fd00:1::1"),
    ],
)
def test_source_not_allowed(packet: bytes, direction: Direction) -> None:
    assert check(packet, direction) is SRC[direction]


@both_directions
def test_destination_in_allowed_set_does_not_help_foreign_source(direction: Direction) -> None:
    assert check(ipv4_udp("198.19.2.1", "198.19.1.1"), direction) is SRC[direction]


@both_directions
def test_empty_allowed_set_rejects_every_source(direction: Direction) -> None:
    assert check(V4_OK, direction, allowed=PrefixSet()) is SRC[direction]
    assert check(V6_OK, direction, allowed=PrefixSet()) is SRC[direction]


@both_directions
def test_default_route_allows_any_source_of_its_family(direction: Direction) -> None:
    v4_all = PrefixSet(["0.0.0.0/0"])
    assert check(ipv4_udp("198.18.99.1", "198.19.1.1"), direction, allowed=v4_all) is None
    assert check(V6_OK, direction, allowed=v4_all) is SRC[direction]


def test_structure_checked_before_source() -> None:
    foreign_and_broken = patched(ipv4_udp("198.19.2.1", "198.19.1.1"), 2, "!H", 1)
    assert check(foreign_and_broken, TUN) is DropReason.TUN_BAD_PACKET


def test_direction_reason_names() -> None:
    for direction, prefix in ((TUN, "tun_"), (PEER, "dgram_")):
        for table in (BAD, BAD_VERSION, OVERSIZE, SRC):
            assert table[direction].value.startswith(prefix)


# -- tests.support.packets -----------------------------------------------------


def _pseudo(packet: bytes) -> bytes:
    """Pseudo-header for the L4 checksum, built independently of the builders."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        return packet[12:20] + bytes([0, packet[9]]) + (len(packet) - ihl).to_bytes(2, "big")
    return packet[8:40] + (len(packet) - IPV6_HEADER).to_bytes(4, "big") + bytes([0, 0, 0, packet[6]])


@pytest.mark.parametrize(
    "packet, proto, pseudo",
    [
        (ipv4_udp("198.18.0.1", "198.19.0.1", b"odd"), packets.PROTO_UDP, True),
        (ipv4_udp("198.18.0.1", "224.0.0.5", b"even", ttl=1, df=True), packets.PROTO_UDP, True),
        (ipv4_icmp_echo("198.18.0.1", "198.19.0.1", 0xBEEF, 0xFFFF, b"xyz"), packets.PROTO_ICMP, False),
        (ipv6_udp("fd00::1", "fd00::2", b"odd"), packets.PROTO_UDP, True),
        (ipv6_udp("fd00::1", "ff02::6", b""), packets.PROTO_UDP, True),
        (ipv6_icmp_echo("fd00::1", "fd00::2", 1, 2, b"ping!"), packets.PROTO_ICMPV6, True),
    ],
)
def test_builders_produce_valid_checksums(packet: bytes, proto: int, pseudo: bool) -> None:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        assert internet_checksum(packet[:ihl]) == 0
        assert packet[9] == proto
        l4 = packet[ihl:]
    else:
        assert packet[6] == proto
        l4 = packet[IPV6_HEADER:]
    assert internet_checksum((_pseudo(packet) if pseudo else b"") + l4) == 0
    assert check(packet, TUN, allowed=PrefixSet(["198.18.0.0/15", "fd00::/8"])) is None


def test_builder_known_answers() -> None:
    # Reference bytes produced by scapy 2.8.0:
    # raw(IP(src="198.18.0.1", dst="198.19.0.1", id=0)/UDP(sport=40000, dport=40001)/b"hi")
    assert ipv4_udp("198.18.0.1", "198.19.0.1", b"hi") == bytes.fromhex(
        "4500001e 00000000 4011 eea7 c6120001 c6130001" "9c40 9c41 000a d2c6 6869"
    )
    # raw(IPv6(src="fd00::1", dst="fd00::2")/ICMPv6EchoRequest(id=1, seq=1)/b"ping")
    assert ipv6_icmp_echo("fd00::1", "fd00::2", 1, 1, b"ping") == bytes.fromhex(
        "60000000 000c 3a 40 fd000000000000000000000000000001 fd000000000000000000000000000002"
        "80 00 a6e1 0001 0001 70696e67"
    )


def test_builder_fields() -> None:
    p = ipv4_udp("198.18.0.1", "198.19.0.1", b"abc", ttl=7, df=True, sport=1, dport=2)
    assert p[8] == 7 and p[6] & 0x40
    assert p[20:24] == b"\x00\x01\x00\x02"
    q = ipv6_icmp_echo("fd00::1", "fd00::2", 0x1234, 0x5678)
    assert q[40] == packets.ICMPV6_ECHO_REQUEST and q[44:48] == bytes.fromhex("12345678")


@pytest.mark.parametrize(
    "src, dst",
    [
        ("192.0.2.1", "198.19.0.1"),
        ("198.19.0.1", "8.8.8.8"),
        ("224.0.0.5", "198.19.0.1"),
        ("198.20.0.1", "198.19.0.1"),
        ("198.19.0.1", "224.0.0.7"),
    ],
)
def test_builders_refuse_addresses_outside_test_networks(src: str, dst: str) -> None:
    with pytest.raises(ValueError):
        ipv4_udp(src, dst)


@pytest.mark.parametrize("src, dst", [("2001:db8::1", "fd00::1"), ("fd00::1", "fe80::1"), ("fd00::1", "198.19.0.1")])
def test_ipv6_builders_refuse_addresses_outside_test_networks(src: str, dst: str) -> None:
    with pytest.raises(ValueError):
        ipv6_udp(src, dst)
