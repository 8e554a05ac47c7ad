"""TUN offloads, pure parts: `vnet.split` (TSO super-packets -> IP packets) and `gro.coalesce` (the reverse, on
write), checked against packets built independently by tests/support/packets.py with correct checksums."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l3ptp.worker import gro, vnet
from l3ptp.worker.vnet import GSO_NONE, GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, PLAIN_HEADER, BadVnet
from tests.support.packets import internet_checksum, ipv4_tcp, ipv4_udp, ipv6_tcp, ipv6_udp

A4, B4, A6, B6 = "198.19.0.1", "198.19.0.2", "fd00::1", "fd00::2"
ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02
TIMESTAMPS = b"\x01\x01\x08\x0a" + bytes(range(8))


def segments(version: int, data: bytes, gso: int, *, seq: int = 1000, flags: int = ACK | PSH, ident: int = 7,
             **kw: object) -> list[bytes]:
    """What the kernel's segmentation of `super_packet(...)` is: built one by one, each with its own checksums."""
    out = []
    chunks = [data[i:i + gso] for i in range(0, len(data), gso)] or [b""]
    for i, chunk in enumerate(chunks):
        f = flags if i == len(chunks) - 1 else flags & ~(FIN | PSH)
        s = (seq + i * gso) % 2**32
        if version == 4:
            out.append(ipv4_tcp(A4, B4, chunk, seq=s, flags=f, ident=(ident + i) % 65536, **kw))  # type: ignore[arg-type]
        else:
            out.append(ipv6_tcp(A6, B6, chunk, seq=s, flags=f, **kw))  # type: ignore[arg-type]
    return out


def super_packet(version: int, data: bytes, gso: int, *, seq: int = 1000, flags: int = ACK | PSH, ident: int = 7,
                 **kw: object) -> bytes:
    """A super-packet as the kernel hands it over: one header (its checksum left partial), then all the data."""
    if version == 4:
        packet = ipv4_tcp(A4, B4, data, seq=seq, flags=flags, ident=ident, **kw)  # type: ignore[arg-type]
        iphl = (packet[0] & 15) * 4
    else:
        packet = ipv6_tcp(A6, B6, data, seq=seq, flags=flags, **kw)  # type: ignore[arg-type]
        iphl = 40
    tcphl = (packet[iphl + 12] >> 4) * 4
    packet = packet[:iphl + 16] + b"\x12\x34" + packet[iphl + 18:]  # the kernel's partial sum: not to be trusted
    header = vnet.encode_header(GSO_TCPV4 if version == 4 else GSO_TCPV6, flags=NEEDS_CSUM, hdr_len=iphl + tcphl,
                                gso_size=gso, csum_start=iphl, csum_offset=16)
    return header + packet


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(("size", "gso"), [(5000, 1200), (5000, 1201), (1, 1240), (1240, 1240), (65000, 1388),
                                            (999, 100), (4096, 1024)])
def test_split_matches_segments_built_one_by_one(version: int, size: int, gso: int) -> None:
    data = os.urandom(size)
    assert vnet.split(super_packet(version, data, gso)) == segments(version, data, gso)


@pytest.mark.parametrize("version", [4, 6])
def test_split_with_tcp_options_wrapping_sequence_and_fin_only_on_the_last(version: int) -> None:
    data = os.urandom(3000)
    kw = {"seq": 2**32 - 1500, "flags": ACK | PSH | FIN, "options": TIMESTAMPS}
    got = vnet.split(super_packet(version, data, 1000, **kw))
    assert got == segments(version, data, 1000, **kw)
    assert len(got) == 3


def test_split_ipv4_with_ip_options_and_the_identification_wrapping() -> None:
    data = os.urandom(2500)
    kw = {"ident": 65535, "ip_options": b"\x94\x04\x00\x00"}  # router alert
    assert vnet.split(super_packet(4, data, 1000, **kw)) == segments(4, data, 1000, **kw)


def test_split_checksums_verify_like_the_kernel() -> None:
    for packet in vnet.split(super_packet(4, os.urandom(4000), 1111)):
        assert internet_checksum(packet[:20]) == 0
        pseudo = packet[12:20] + struct.pack("!xBH", 6, len(packet) - 20)
        assert internet_checksum(pseudo + packet[20:]) == 0


def test_split_without_gso_passes_the_packet_or_completes_its_partial_checksum() -> None:
    udp = ipv4_udp(A4, B4, b"x" * 333)
    assert vnet.split(PLAIN_HEADER + udp) == [udp]
    for packet, start in ((ipv4_udp(A4, B4, b"y" * 101), 20), (ipv6_udp(A6, B6, b"z" * 77), 40),
                          (ipv6_tcp(A6, B6, b"w" * 999), 40)):
        offset = 6 if packet[9 if packet[0] >> 4 == 4 else 6] == 17 else 16
        # The kernel's partial checksum: the pseudo-header sum, not complemented.
        if packet[0] >> 4 == 4:
            pseudo = packet[12:20] + struct.pack("!xBH", packet[9], len(packet) - start)
        else:
            pseudo = packet[8:40] + struct.pack("!I3xB", len(packet) - start, packet[6])
        partial = (~internet_checksum(pseudo)) & 0xFFFF
        at = start + offset
        raw = packet[:at] + partial.to_bytes(2, "big") + packet[at + 2:]
        header = vnet.encode_header(GSO_NONE, flags=NEEDS_CSUM, csum_start=start, csum_offset=offset)
        assert vnet.split(header + raw) == [packet]


@pytest.mark.parametrize("data", [
    b"",
    PLAIN_HEADER,
    vnet.encode_header(GSO_TCPV4 | 0x80, gso_size=100) + ipv4_tcp(A4, B4, b"x" * 300),  # ECN: not offered
    vnet.encode_header(5, gso_size=100) + ipv4_udp(A4, B4, b"x" * 300),  # UDP_L4: not offered
    vnet.encode_header(3, gso_size=100) + ipv4_udp(A4, B4, b"x" * 300),  # UFO
    vnet.encode_header(GSO_TCPV6, gso_size=100) + ipv4_tcp(A4, B4, b"x" * 300),  # family mismatch
    vnet.encode_header(GSO_TCPV4, gso_size=0) + ipv4_tcp(A4, B4, b"x" * 300),
    vnet.encode_header(GSO_TCPV4, gso_size=1) + ipv4_tcp(A4, B4, b"x" * 60000),  # 60000 segments
    vnet.encode_header(GSO_TCPV4, gso_size=100) + ipv4_udp(A4, B4, b"x" * 300),  # not TCP
    vnet.encode_header(GSO_TCPV4, gso_size=100) + ipv4_tcp(A4, B4, b"x" * 300)[:30],  # truncated TCP header
    vnet.encode_header(GSO_TCPV6, gso_size=100) + ipv6_udp(A6, B6, b"x" * 300),  # extension header / not TCP
    vnet.encode_header(GSO_NONE, flags=NEEDS_CSUM, csum_start=20, csum_offset=400) + ipv4_udp(A4, B4, b"x"),
    vnet.encode_header(GSO_NONE, flags=NEEDS_CSUM, csum_start=4000) + ipv4_udp(A4, B4, b"x"),
], ids=lambda d: d[:12].hex() or "empty")
def test_split_refuses_what_it_does_not_understand(data: bytes) -> None:
    with pytest.raises(BadVnet):
        vnet.split(data)


@given(st.binary(max_size=3000))
def test_ones_complement_sum_is_rfc1071(data: bytes) -> None:
    assert vnet.checksum(vnet.ones_sum(data)) == internet_checksum(data)


# ---- coalescing on write ----------------------------------------------------------------------------------------


def joined(buffers: list) -> bytes:
    return b"".join(bytes(b) for b in buffers)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(("size", "gso"), [(5000, 1200), (6000, 1201), (65000, 1240)])
def test_coalesce_then_split_is_the_identity(version: int, size: int, gso: int) -> None:
    data = os.urandom(size)
    packets = segments(version, data, gso, options=TIMESTAMPS)
    writes = gro.coalesce(packets)
    back = [p for buffers, _ in writes for p in vnet.split(joined(buffers))]
    assert back == packets
    assert sum(len(carried) for _, carried in writes) == len(packets)
    payload = b"".join(joined(buffers)[10 + (20 if version == 4 else 40) + 32:] for buffers, _ in writes)
    assert payload == data


def test_coalesced_header_is_what_the_kernel_expects() -> None:
    packets = segments(4, os.urandom(3600), 1200)
    ((buffers, carried),) = gro.coalesce(packets)
    assert carried == packets
    out = joined(buffers)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", out[:10])
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV4, 40, 1200, 20, 16)
    packet = out[10:]
    assert struct.unpack("!H", packet[2:4])[0] == len(packet) == 40 + 3600
    assert internet_checksum(packet[:20]) == 0
    assert packet[33] & PSH  # the last segment's PSH
    pseudo = packet[12:20] + struct.pack("!xBH", 6, len(packet) - 20)
    assert packet[36:38] == ((~internet_checksum(pseudo)) & 0xFFFF).to_bytes(2, "big")  # the partial sum


LOCAL = {4: frozenset({socket.inet_pton(socket.AF_INET, B4)}), 6: frozenset({socket.inet_pton(socket.AF_INET6, B6)})}


def _tcp_checksum_verifies(packet: bytes) -> bool:
    """What the kernel's `tcp_checksum_complete` checks: the sum over pseudo-header and segment is all ones."""
    iphl = 20 if packet[0] >> 4 == 4 else 40
    addresses = packet[12:20] if iphl == 20 else packet[8:40]
    return internet_checksum(addresses + struct.pack("!xBH", 6, len(packet) - iphl) + packet[iphl:]) == 0


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize(("size", "gso"), [(3600, 1200), (6000, 1201), (65000, 1228), (2001, 1000)])
def test_to_a_local_address_the_merged_checksum_is_complete_and_the_kernel_verifies_it(version: int, size: int,
                                                                                       gso: int) -> None:
    """To the TUN's own address no payload is summed here: the merged packet carries the complete checksum built
    from the segments' own (odd segment sizes: sums of payloads at odd offsets swap bytes), without NEEDS_CSUM."""
    data = os.urandom(size)
    packets = segments(version, data, gso, options=TIMESTAMPS)
    writes = gro.coalesce(packets, LOCAL[version])
    assert len(writes) == 1 and writes[0][1] == packets
    out = joined(writes[0][0])
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", out[:10])
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (0, GSO_TCPV4 if version == 4 else GSO_TCPV6,
                                                                    gso, 0, 0)
    assert hdr_len == (20 if version == 4 else 40) + 32
    assert _tcp_checksum_verifies(out[10:])
    assert vnet.split(out) == packets  # and the bytes are the same as merged the other way


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("where", ["payload", "checksum field"])
def test_a_corrupted_segment_to_a_local_address_fails_the_kernels_check_of_the_merged_packet(version: int,
                                                                                            where: str) -> None:
    """Merging never repairs: a segment whose checksum does not match its bytes (in the payload or the field)
    makes the whole super-packet fail the kernel's verification; elsewhere it is not merged at all."""
    packets = [bytearray(p) for p in segments(version, os.urandom(4 * 1200), 1200, options=TIMESTAMPS)]
    iphl = 20 if version == 4 else 40
    packets[2][-300 if where == "payload" else iphl + 17] ^= 0x40
    merged = gro.coalesce([bytes(p) for p in packets], LOCAL[version])
    assert len(merged) == 1
    assert not _tcp_checksum_verifies(joined(merged[0][0])[10:])
    routed = gro.coalesce([bytes(p) for p in packets])  # not a local destination: verified here
    assert [len(carried) for _, carried in routed] == [2, 1, 1]


def test_64k_limit_makes_several_super_packets() -> None:
    packets = segments(4, os.urandom(120 * 1240), 1240, flags=ACK)
    writes = gro.coalesce(packets)
    assert len(writes) == 3
    assert all(len(joined(b)) - 10 <= 65535 for b, _ in writes)


def test_what_must_not_merge_is_written_alone_in_order() -> None:
    data = os.urandom(1000)
    good = segments(4, data * 4, 1000, flags=ACK)
    bad_csum = bytearray(good[1])
    bad_csum[-1] ^= 1
    cases = {
        "bad checksum": [good[0], bytes(bad_csum)],
        "other ack": [good[0], ipv4_tcp(A4, B4, data, seq=2000, ack=99, ident=8)],
        "other window": [good[0], ipv4_tcp(A4, B4, data, seq=2000, window=7, ident=8)],
        "other options": [good[0], ipv4_tcp(A4, B4, data, seq=2000, options=TIMESTAMPS, ident=8)],
        "other ttl": [good[0], ipv4_tcp(A4, B4, data, seq=2000, ttl=3, ident=8)],
        "gap": [good[0], good[2]],
        "identification not the next": [good[0], ipv4_tcp(A4, B4, data, seq=2000, ident=9)],
        "bad IPv4 header checksum": [good[0], good[1][:10] + bytes([good[1][10] ^ 1]) + good[1][11:]],
        "bigger after smaller": [ipv4_tcp(A4, B4, data[:500], seq=1000), ipv4_tcp(A4, B4, data, seq=1500)],
        "after psh": [ipv4_tcp(A4, B4, data, seq=1000, flags=ACK | PSH), good[1]],
        "syn": [good[0], ipv4_tcp(A4, B4, data, seq=2000, flags=ACK | SYN)],
        "fin": [good[0], ipv4_tcp(A4, B4, data, seq=2000, flags=ACK | FIN)],
        "pure ack": [good[0], ipv4_tcp(A4, B4, b"", seq=2000)],
        "ip options": [ipv4_tcp(A4, B4, data, ip_options=b"\x94\x04\0\0"), ipv4_tcp(A4, B4, data, seq=2000,
                                                                                    ip_options=b"\x94\x04\0\0")],
        "not tcp": [ipv4_udp(A4, B4, data), ipv4_udp(A4, B4, data)],
    }
    for name, packets in cases.items():
        writes = gro.coalesce(packets)
        assert [joined(b) for b, _ in writes] == [PLAIN_HEADER + p for p in packets], name


def test_a_flows_fin_is_not_overtaken_by_its_data_and_other_flows_interleave() -> None:
    x = segments(4, os.urandom(3000), 1000, flags=ACK)
    y = segments(6, os.urandom(3000), 1000, flags=ACK)
    fin = ipv4_tcp(A4, B4, b"", seq=4000, flags=ACK | FIN)  # out of place, as a reordered FIN would be
    writes = gro.coalesce([x[0], y[0], x[1], y[1], fin, x[2], y[2]])
    # x[2] comes after the FIN as it did: it starts a new super-packet instead of joining the one before the FIN.
    assert [carried for _, carried in writes] == [[x[0], x[1]], [y[0], y[1], y[2]], [fin], [x[2]]]


def test_smaller_last_segment_closes_the_super_packet() -> None:
    packets = segments(6, os.urandom(2500), 1000, flags=ACK)  # 1000, 1000, 500
    more = ipv6_tcp(A6, B6, b"q" * 500, seq=3500)
    writes = gro.coalesce([*packets, more])
    assert [len(c) for _, c in writes] == [3, 1]
