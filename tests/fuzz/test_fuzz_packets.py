"""Property tests for the untrusted packet parsers.

`parse_header_untrusted` may raise only `BadPacket`, and whatever it returns
must agree with the header bytes. `check_ip_untrusted` never raises and only
returns None or a `DropReason` of the right direction. Encoding round-trips.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from l3ptp.ipc.constants import (
    HEADER_LEN,
    HEADER_TYPE_IP,
    HEADER_VERSION,
    IP_VERSION_4,
    IP_VERSION_6,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
)
from l3ptp.ipc.counters import DropReason, SequenceTracker
from l3ptp.worker.header import HEADER, BadPacket, encode_datagram, pack_header, parse_header_untrusted
from l3ptp.worker.ippacket import Direction, PrefixSet, check_ip_untrusted
from tests.support.packets import ipv4_icmp_echo, ipv4_udp, ipv6_icmp_echo, ipv6_udp

MANY = settings(max_examples=3000, deadline=None)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)

ALLOWED = PrefixSet(["198.19.1.0/24", "198.18.0.0/16", "fd00:1::/64"])
ALLOWED_REASONS = {
    Direction.FROM_TUN: {
        DropReason.TUN_BAD_PACKET,
        DropReason.TUN_BAD_IP_VERSION,
        DropReason.TUN_OVERSIZE,
        DropReason.TUN_SRC_NOT_ALLOWED,
    },
    Direction.FROM_PEER: {
        DropReason.DGRAM_BAD_IP,
        DropReason.DGRAM_BAD_IP_VERSION,
        DropReason.DGRAM_OVERSIZE,
        DropReason.DGRAM_SRC_NOT_ALLOWED,
    },
}
HEADER_REASONS = {DropReason.DGRAM_BAD_HEADER, DropReason.DGRAM_BAD_IP_VERSION}

# -- strategies ----------------------------------------------------------------

octet = st.integers(0, 255)
src_v4 = st.sampled_from(["198.19.1.", "198.18.3.", "198.19.2."]).flatmap(
    lambda prefix: octet.map(lambda last: f"{prefix}{last}")
)
dst_v4 = st.one_of(st.sampled_from(["224.0.0.5", "224.0.0.6"]), octet.map(lambda last: f"198.19.9.{last}"))
src_v6 = st.sampled_from(["fd00:1::", "fd00:2::", "fd00:1:0:1::"]).flatmap(
    lambda prefix: st.integers(1, 0xFFFF).map(lambda last: f"{prefix}{last:x}")
)
dst_v6 = st.one_of(st.sampled_from(["ff02::5", "ff02::6"]), st.integers(1, 0xFFFF).map(lambda last: f"fd00:9::{last:x}"))
body = st.binary(max_size=200)

valid_packets = st.one_of(
    st.builds(ipv4_udp, src_v4, dst_v4, body),
    st.builds(ipv4_icmp_echo, src_v4, dst_v4, U16, U16, body),
    st.builds(ipv6_udp, src_v6, dst_v6, body),
    st.builds(ipv6_icmp_echo, src_v6, dst_v6, U16, U16, body),
)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """`base` with some bytes overwritten, bits flipped, or cut/extended."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "flip", "truncate", "extend", "insert", "delete"]))
        if op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif not data:
            continue
        elif op == "set":
            data[draw(st.integers(0, len(data) - 1))] = draw(U8)
        elif op == "flip":
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


def header_with(
    *,
    kind: int = HEADER_TYPE_IP,
    version: int = HEADER_VERSION,
    header_len: int = HEADER_LEN,
    ip_version: int = IP_VERSION_4,
    payload_len: int = 0,
) -> bytes:
    return HEADER.pack(kind, version, header_len, 1, 2, 0, ip_version, payload_len)


# Random bytes that often get past the first checks: a plausible header prefix
# with random fields, then random bytes.
near_header = st.builds(
    lambda kind, version, header_len, ip_version, payload_len, rest: header_with(
        kind=kind, version=version, header_len=header_len, ip_version=ip_version, payload_len=payload_len
    )
    + rest,
    st.sampled_from([HEADER_TYPE_IP, HEADER_TYPE_IP, 0, 0xFF]),
    st.sampled_from([HEADER_VERSION, HEADER_VERSION, 0, 2]),
    st.one_of(st.integers(0, 40), U16),
    st.sampled_from([IP_VERSION_4, IP_VERSION_6, 0, 5, 0xFF]),
    st.one_of(st.integers(0, 300), U16),
    st.binary(max_size=300),
)
valid_datagrams = st.builds(encode_datagram, U32, U32, valid_packets)


def assert_parse_consistent(data: bytes) -> None:
    """Either BadPacket with a header reason, or a result matching the bytes."""
    try:
        context_id, sequence, flags, ip_version, payload = parse_header_untrusted(data)
    except BadPacket as err:
        assert err.reason in HEADER_REASONS
        return
    kind, version, header_len, ctx, seq, flg, ipv, payload_len = HEADER.unpack_from(data)
    assert (kind, version) == (HEADER_TYPE_IP, HEADER_VERSION)
    assert (context_id, sequence, flags, ip_version) == (ctx, seq, flg, ipv)
    assert ip_version in (IP_VERSION_4, IP_VERSION_6)
    assert HEADER_LEN <= header_len
    assert isinstance(payload, memoryview)
    assert payload.obj is data
    assert len(payload) == payload_len == len(data) - header_len > 0
    assert payload == data[header_len:]
    assert payload[0] >> 4 == ip_version


# -- parse_header_untrusted ------------------------------------------------------


@MANY
@given(st.binary(max_size=400))
def test_parse_random_bytes(data: bytes) -> None:
    assert_parse_consistent(data)


@MANY
@given(near_header)
def test_parse_near_valid_headers(data: bytes) -> None:
    assert_parse_consistent(data)


@MANY
@given(mutated(valid_datagrams))
def test_parse_mutated_datagrams(data: bytes) -> None:
    assert_parse_consistent(data)


@MANY
@given(valid_datagrams)
def test_parse_accepts_every_encoded_datagram(data: bytes) -> None:
    payload = parse_header_untrusted(data)[4]
    assert payload == data[HEADER_LEN:]


# -- round trips ---------------------------------------------------------------


@MANY
@given(U32, U32, st.sampled_from([IP_VERSION_4, IP_VERSION_6]), st.binary(max_size=MTU_MAX))
def test_encode_parse_round_trip(context_id: int, sequence: int, ip_version: int, rest: bytes) -> None:
    packet = bytes([ip_version << 4]) + rest
    datagram = encode_datagram(context_id, sequence, packet)
    assert len(datagram) == HEADER_LEN + len(packet)
    assert parse_header_untrusted(datagram) == (context_id, sequence, 0, ip_version, memoryview(packet))


@MANY
@given(
    U32,
    U32,
    U8,
    st.sampled_from([IP_VERSION_4, IP_VERSION_6]),
    st.integers(0, 15),
    st.binary(max_size=64),
    st.binary(max_size=2000),
)
def test_pack_header_round_trip_with_flags_and_extension(
    context_id: int, sequence: int, flags: int, ip_version: int, low_nibble: int, extension: bytes, rest: bytes
) -> None:
    packet = bytes([ip_version << 4 | low_nibble]) + rest
    header = bytearray(pack_header(context_id, sequence, ip_version, len(packet), flags))
    struct.pack_into("!H", header, 2, HEADER_LEN + len(extension))  # a future, longer header
    datagram = bytes(header) + extension + packet
    parsed = parse_header_untrusted(memoryview(datagram))
    assert parsed[:4] == (context_id, sequence, flags, ip_version)
    assert parsed[4] == packet


# -- check_ip_untrusted --------------------------------------------------------

directions = st.sampled_from(list(Direction))
mtus = st.one_of(st.just(MTU_DEFAULT), st.integers(MTU_MIN, MTU_MAX), st.integers(0, 100))


def assert_check_total(packet: bytes, mtu: int, direction: Direction) -> DropReason | None:
    verdict = check_ip_untrusted(packet, mtu=mtu, allowed_src=ALLOWED, direction=direction)
    assert verdict is None or verdict in ALLOWED_REASONS[direction]
    assert check_ip_untrusted(memoryview(packet), mtu=mtu, allowed_src=ALLOWED, direction=direction) is verdict
    if verdict is None:
        assert 0 < len(packet) <= mtu
        assert packet[0] >> 4 in (IP_VERSION_4, IP_VERSION_6)
    return verdict


@MANY
@given(st.binary(max_size=300), mtus, directions)
def test_check_random_bytes(packet: bytes, mtu: int, direction: Direction) -> None:
    assert_check_total(packet, mtu, direction)


@MANY
@given(
    st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6F]).flatmap(
        lambda first: st.binary(max_size=120).map(lambda rest: bytes([first]) + rest)
    ),
    mtus,
    directions,
)
def test_check_random_bytes_with_plausible_version(packet: bytes, mtu: int, direction: Direction) -> None:
    assert_check_total(packet, mtu, direction)


@MANY
@given(mutated(valid_packets), mtus, directions)
def test_check_mutated_packets(packet: bytes, mtu: int, direction: Direction) -> None:
    assert_check_total(packet, mtu, direction)


@MANY
@given(valid_packets, directions)
def test_check_valid_packets_only_fail_on_source(packet: bytes, direction: Direction) -> None:
    verdict = assert_check_total(packet, MTU_DEFAULT, direction)
    if packet[0] >> 4 == IP_VERSION_4:
        allowed = ALLOWED.contains_v4(packet[12:16])
    else:
        allowed = ALLOWED.contains_v6(packet[8:24])
    if allowed:
        assert verdict is None
    else:
        assert verdict in {DropReason.TUN_SRC_NOT_ALLOWED, DropReason.DGRAM_SRC_NOT_ALLOWED}


# -- SequenceTracker -----------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(U32, st.lists(st.booleans(), max_size=300))
def test_sequence_counts_gaps_exactly_for_in_order_delivery(start: int, middle: list[bool]) -> None:
    delivered = [True, *middle, True]  # losses outside the span seen are invisible
    tracker = SequenceTracker()
    for offset, arrived in enumerate(delivered):
        if arrived:
            tracker.observe((start + offset) & 0xFFFFFFFF)
    assert tracker.received == sum(delivered)
    assert tracker.expected == len(delivered)
    assert tracker.lost == delivered.count(False)


@settings(max_examples=1000, deadline=None)
@given(U32, st.integers(1, 200).flatmap(lambda n: st.permutations(range(n))))
def test_sequence_reordering_without_loss_is_no_loss(start: int, order: list[int]) -> None:
    tracker = SequenceTracker()
    for offset in order:
        tracker.observe((start + offset) & 0xFFFFFFFF)
    assert (tracker.received, tracker.expected, tracker.lost) == (len(order), len(order), 0)
