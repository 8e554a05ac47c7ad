"""Unit tests for l3ptp.worker.header."""

from __future__ import annotations

import struct

import pytest

from l3ptp.ipc.constants import HEADER_LEN, HEADER_TYPE_IP, HEADER_VERSION, IP_VERSION_4, IP_VERSION_6
from l3ptp.ipc.counters import DropReason
from l3ptp.worker.header import HEADER, BadPacket, encode_datagram, pack_header, parse_header_untrusted
from tests.support.packets import ipv4_icmp_echo, ipv4_udp, ipv6_icmp_echo, ipv6_udp

V4 = ipv4_udp("198.19.0.1", "198.19.0.2", b"hello")
V6 = ipv6_udp("fd00::1", "fd00::2", b"hello")
CTX = 0xA1B2C3D4
SEQ = 0x01020304


def raw_datagram(
    *,
    kind: int = HEADER_TYPE_IP,
    version: int = HEADER_VERSION,
    header_len: int = HEADER_LEN,
    context_id: int = CTX,
    sequence: int = SEQ,
    flags: int = 0,
    ip_version: int = IP_VERSION_4,
    payload_len: int | None = None,
    extra: bytes = b"",
    payload: bytes = V4,
) -> bytes:
    """A datagram with arbitrary (possibly invalid) header fields."""
    if payload_len is None:
        payload_len = len(payload)
    fields = (kind, version, header_len, context_id, sequence, flags, ip_version, payload_len)
    return HEADER.pack(*fields) + extra + payload


def reason_of(buf: bytes | bytearray | memoryview) -> DropReason:
    with pytest.raises(BadPacket) as info:
        parse_header_untrusted(buf)
    return info.value.reason


# -- layout --------------------------------------------------------------------


def test_header_struct_is_16_bytes() -> None:
    assert HEADER.size == HEADER_LEN
    assert HEADER.format == "!BBHIIBBH"


def test_pack_header_exact_bytes() -> None:
    assert pack_header(CTX, SEQ, IP_VERSION_6, 0x0506, flags=0x80) == bytes.fromhex(
        "03 01 0010 a1b2c3d4 01020304 80 06 0506"
    )


def test_pack_header_default_flags_zero() -> None:
    assert pack_header(1, 2, IP_VERSION_4, 3)[12] == 0


def test_pack_header_wraps_sequence() -> None:
    assert pack_header(1, (1 << 32) + 7, IP_VERSION_4, 3) == pack_header(1, 7, IP_VERSION_4, 3)


@pytest.mark.parametrize(
    "args",
    [(1 << 32, 0, IP_VERSION_4, 1), (-1, 0, IP_VERSION_4, 1), (0, 0, IP_VERSION_4, 1 << 16), (0, 0, 256, 1)],
)
def test_pack_header_rejects_out_of_range_fields(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(struct.error):
        pack_header(*args)


def test_encode_datagram_layout() -> None:
    dgram = encode_datagram(CTX, SEQ, V6)
    assert type(dgram) is bytes
    assert dgram == pack_header(CTX, SEQ, IP_VERSION_6, len(V6)) + V6


def test_encode_datagram_accepts_memoryview_and_takes_version_from_nibble() -> None:
    dgram = encode_datagram(CTX, SEQ, memoryview(V4))
    assert dgram[:HEADER_LEN] == pack_header(CTX, SEQ, IP_VERSION_4, len(V4))
    assert dgram[HEADER_LEN:] == V4


def test_encode_datagram_wraps_sequence() -> None:
    assert encode_datagram(CTX, (1 << 32) + 1, V4) == encode_datagram(CTX, 1, V4)


def test_encode_datagram_rejects_empty_packet() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_datagram(CTX, SEQ, b"")


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        V4,
        V6,
        ipv4_icmp_echo("198.18.0.1", "198.19.0.1", 7, 9, b"x" * 100),
        ipv6_icmp_echo("fd00::1", "ff02::5"),
    ],
)
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_round_trip(packet: bytes, wrap: type) -> None:
    context_id, sequence, flags, ip_version, payload = parse_header_untrusted(wrap(encode_datagram(CTX, SEQ, packet)))
    assert (context_id, sequence, flags) == (CTX, SEQ, 0)
    assert ip_version == packet[0] >> 4
    assert type(payload) is memoryview
    assert payload == packet


@pytest.mark.parametrize("context_id", [0, 1, 0xFFFFFFFF])
@pytest.mark.parametrize("sequence", [0, 0x7FFFFFFF, 0xFFFFFFFF])
@pytest.mark.parametrize("flags", [0, 1, 0xFF])
def test_round_trip_field_extremes(context_id: int, sequence: int, flags: int) -> None:
    dgram = pack_header(context_id, sequence, IP_VERSION_6, len(V6), flags) + V6
    assert parse_header_untrusted(dgram)[:4] == (context_id, sequence, flags, IP_VERSION_6)


def test_unknown_flags_are_returned_not_rejected() -> None:
    assert parse_header_untrusted(raw_datagram(flags=0xFF))[2] == 0xFF


# -- zero copy -----------------------------------------------------------------


def test_payload_shares_memory_with_bytes_input() -> None:
    dgram = encode_datagram(CTX, SEQ, V4)
    payload = parse_header_untrusted(dgram)[4]
    assert payload.obj is dgram


def test_payload_shares_memory_with_bytearray_input() -> None:
    dgram = bytearray(encode_datagram(CTX, SEQ, V4))
    payload = parse_header_untrusted(dgram)[4]
    dgram[-1] ^= 0xFF
    assert payload[-1] == dgram[-1]
    assert payload.obj is dgram
    payload.release()


def test_payload_from_memoryview_input_is_a_slice_of_it() -> None:
    backing = bytearray(b"\xee" * 8 + encode_datagram(CTX, SEQ, V6))
    view = memoryview(backing)[8:]
    payload = parse_header_untrusted(view)[4]
    assert payload.obj is backing
    backing[8 + HEADER_LEN] = 0x6F
    assert payload[0] == 0x6F
    payload.release()
    view.release()


# -- header_len ----------------------------------------------------------------


@pytest.mark.parametrize("extra", [b"\0", b"\xff" * 4, bytes(range(200))])
def test_longer_header_is_skipped(extra: bytes) -> None:
    dgram = raw_datagram(header_len=HEADER_LEN + len(extra), extra=extra, payload=V6, ip_version=IP_VERSION_6)
    context_id, sequence, _, ip_version, payload = parse_header_untrusted(dgram)
    assert (context_id, sequence, ip_version) == (CTX, SEQ, IP_VERSION_6)
    assert payload == V6
    assert payload.obj is dgram


# -- rejections ----------------------------------------------------------------


@pytest.mark.parametrize("size", range(HEADER_LEN))
def test_short_datagram_is_bad_header(size: int) -> None:
    assert reason_of(encode_datagram(CTX, SEQ, V4)[:size]) is DropReason.DGRAM_BAD_HEADER


@pytest.mark.parametrize("kind", [0x00, 0x01, 0x02, 0x04, 0xFF])
def test_wrong_type_is_bad_header(kind: int) -> None:
    assert reason_of(raw_datagram(kind=kind)) is DropReason.DGRAM_BAD_HEADER


@pytest.mark.parametrize("version", [0x00, 0x02, 0xFF])
def test_wrong_version_is_bad_header(version: int) -> None:
    assert reason_of(raw_datagram(version=version)) is DropReason.DGRAM_BAD_HEADER


@pytest.mark.parametrize("header_len", [0, 1, HEADER_LEN - 1])
def test_header_len_below_16_is_bad_header(header_len: int) -> None:
    assert reason_of(raw_datagram(header_len=header_len)) is DropReason.DGRAM_BAD_HEADER


def test_header_len_beyond_datagram_is_bad_header() -> None:
    dgram = raw_datagram(header_len=HEADER_LEN + len(V4) + 1, payload_len=0)
    assert reason_of(dgram) is DropReason.DGRAM_BAD_HEADER
    assert reason_of(raw_datagram(header_len=0xFFFF, payload_len=0)) is DropReason.DGRAM_BAD_HEADER


def test_header_len_consuming_whole_datagram_is_empty_payload() -> None:
    dgram = raw_datagram(header_len=HEADER_LEN + len(V4), payload_len=0)
    assert reason_of(dgram) is DropReason.DGRAM_BAD_IP_VERSION


@pytest.mark.parametrize("delta", [-len(V4), -1, 1, 0xFFFF - len(V4)])
def test_payload_len_mismatch_is_bad_header(delta: int) -> None:
    assert reason_of(raw_datagram(payload_len=len(V4) + delta)) is DropReason.DGRAM_BAD_HEADER


def test_truncated_datagram_is_bad_header() -> None:
    assert reason_of(encode_datagram(CTX, SEQ, V4)[:-1]) is DropReason.DGRAM_BAD_HEADER


def test_trailing_garbage_is_bad_header() -> None:
    assert reason_of(encode_datagram(CTX, SEQ, V4) + b"\0") is DropReason.DGRAM_BAD_HEADER


@pytest.mark.parametrize("ip_version", [0, 1, 5, 7, 15, 0x44, 0xFF])
def test_unsupported_ip_version_is_bad_ip_version(ip_version: int) -> None:
    assert reason_of(raw_datagram(ip_version=ip_version)) is DropReason.DGRAM_BAD_IP_VERSION


def test_ip_version_not_matching_nibble_is_bad_ip_version() -> None:
    assert reason_of(raw_datagram(ip_version=IP_VERSION_6, payload=V4)) is DropReason.DGRAM_BAD_IP_VERSION
    assert reason_of(raw_datagram(ip_version=IP_VERSION_4, payload=V6)) is DropReason.DGRAM_BAD_IP_VERSION


def test_ip_version_checked_against_payload_not_extra_header_bytes() -> None:
    dgram = raw_datagram(header_len=HEADER_LEN + 1, extra=b"\x40", ip_version=IP_VERSION_4, payload=V6)
    assert reason_of(dgram) is DropReason.DGRAM_BAD_IP_VERSION


@pytest.mark.parametrize("ip_version", [IP_VERSION_4, IP_VERSION_6])
def test_empty_payload_is_bad_ip_version(ip_version: int) -> None:
    assert reason_of(raw_datagram(ip_version=ip_version, payload=b"")) is DropReason.DGRAM_BAD_IP_VERSION


def test_bad_packet_carries_reason_and_message() -> None:
    err = BadPacket(DropReason.DGRAM_BAD_HEADER, "short datagram")
    assert err.reason is DropReason.DGRAM_BAD_HEADER
    assert str(err) == "dgram_bad_header: short datagram"
    assert str(BadPacket(DropReason.DGRAM_BAD_IP_VERSION)) == "dgram_bad_ip_version"
