"""Property tests for TUN offloads: what a TUN with IFF_VNET_HDR hands the worker is outside input.

`vnet.split` of any header and bytes raises only `BadVnet`, and what it returns are IP packets no larger than
an IP packet can be; a read through `TunIO` never raises and counts what it refuses as `tun_bad_vnet`.
`gro.coalesce` of any packets (from the peer: also outside input) never raises, carries every packet exactly
once, and every super-packet it makes splits back into exactly the packets it carries. To a local address
(checksums left to the kernel), a super-packet's checksum verifies when each packet it carries does and fails
when one of them does not.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from l3ptp.ipc.counters import Counters, DropReason
from l3ptp.worker import gro, vnet
from l3ptp.worker.tun_io import TunIO, TunMode
from tests.support.fake_tun import FakeTun
from tests.unit.test_worker_offload import LOCAL, _tcp_checksum_verifies, segments, super_packet

MANY = settings(max_examples=2000, deadline=None)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
headers = st.builds(lambda *f: struct.pack("<BBHHHH", *f), st.sampled_from([0, 1, 2, 3, 0x80, 0xFF]),
                    st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0xFF]), U16, st.one_of(U16, st.integers(1, 2000)),
                    st.one_of(U16, st.integers(0, 80)), st.one_of(U16, st.integers(0, 40)))


def mutated(data: bytes, at: int, value: int) -> bytes:
    at %= max(1, len(data))
    return data[:at] + bytes([value]) + data[at + 1:] if data else data


# Real super-packets with one byte changed anywhere (headers included), and raw bytes behind any header.
inputs = st.one_of(
    st.builds(lambda h, body: h + body, headers, st.binary(max_size=200)),
    st.builds(lambda v, n, g, at, value: mutated(super_packet(v, bytes(n), g), at, value),
              st.sampled_from([4, 6]), st.integers(0, 5000), st.integers(1, 1500), st.integers(0, 6000), U8),
)


@MANY
@given(inputs)
def test_split_raises_only_badvnet_and_returns_ip_sized_packets(data: bytes) -> None:
    try:
        packets = vnet.split(data)
    except vnet.BadVnet:
        return
    assert packets and all(isinstance(p, bytes) and len(p) <= vnet.IP_MAX + vnet.IPV6_HEADER for p in packets)
    assert len(packets) <= vnet.MAX_SEGMENTS


@settings(max_examples=300, deadline=None)
@given(st.lists(inputs, min_size=1, max_size=8))
def test_reads_never_raise_and_refusals_are_counted(reads: list[bytes]) -> None:
    with FakeTun() as tun:
        counters = Counters()
        io = TunIO(tun.worker_fd, TunMode(True, True, "fuzz"), counters, lambda _: None)
        sent = [r for r in reads if r]  # a zero-length message would read as end of file
        for r in sent:
            tun.inject(r)
        packets: list[bytes] = []
        while True:  # batches of at most 64 packets; the rest of a super-packet is carried to the next
            got, lost = io.read_batch(64)
            assert lost is None and len(got) <= 64
            packets += got
            if not got and not io.carry:
                break
        refused = counters.drops[DropReason.TUN_BAD_VNET]
        assert refused == counters.tun_rx_packets
        assert refused + sum(1 for r in sent if _splits(r)) == len(sent)
        assert len(packets) == sum(len(vnet.split(r)) for r in sent if _splits(r))


def _splits(data: bytes) -> bool:
    try:
        vnet.split(data)
    except vnet.BadVnet:
        return False
    return True


# Streams of real segments (two flows, both families) with bytes changed, reordered, cut or duplicated.
def stream(version: int, size: int, gso: int, picks: list[int], changes: dict[int, tuple[int, int]]) -> list[bytes]:
    whole = segments(version, bytes(range(256)) * (size // 256 + 1), gso)
    picked = [whole[i % len(whole)] for i in picks]
    return [mutated(p, *changes[i]) if i in changes else p for i, p in enumerate(picked)]


streams = st.builds(stream, st.sampled_from([4, 6]), st.integers(1, 8000), st.integers(1, 1400),
                    st.lists(st.integers(0, 20), max_size=24),
                    st.dictionaries(st.integers(0, 23), st.tuples(st.integers(0, 2000), U8), max_size=3))


@MANY
@given(st.one_of(streams, st.lists(st.binary(max_size=120), max_size=12)))
def test_coalesce_carries_each_packet_once_and_splits_back(packets: list[bytes]) -> None:
    writes = gro.coalesce(packets)
    carried = [p for _, c in writes for p in c]
    assert sorted(carried) == sorted(packets)
    for buffers, c in writes:
        joined = b"".join(bytes(b) for b in buffers)
        assert len(joined) - vnet.VNET_HDR_LEN <= vnet.IP_MAX + vnet.IPV6_HEADER
        if len(c) > 1:
            assert vnet.split(joined) == c
        else:
            assert joined == vnet.PLAIN_HEADER + bytes(c[0])


@MANY
@given(st.one_of(streams, st.lists(st.binary(max_size=120), max_size=12)))
def test_coalesce_to_a_local_address_never_launders_a_bad_checksum(packets: list[bytes]) -> None:
    writes = gro.coalesce(packets, LOCAL[4] | LOCAL[6])
    carried = [p for _, c in writes for p in c]
    assert sorted(carried) == sorted(packets)
    for buffers, c in writes:
        joined = b"".join(bytes(b) for b in buffers)
        assert len(joined) - vnet.VNET_HDR_LEN <= vnet.IP_MAX + vnet.IPV6_HEADER
        if len(c) == 1:
            assert joined == vnet.PLAIN_HEADER + bytes(c[0])
            continue
        bad = sum(not _tcp_checksum_verifies(bytes(p)) for p in c)
        if bad == 0:
            assert _tcp_checksum_verifies(joined[vnet.VNET_HDR_LEN:])
            assert vnet.split(joined) == c
        elif bad == 1:  # (two bad ones could cancel out, as they could within one 16-bit checksum)
            assert not _tcp_checksum_verifies(joined[vnet.VNET_HDR_LEN:])


@MANY
@given(st.one_of(streams, st.lists(st.binary(max_size=120), max_size=12)), st.booleans())
def test_the_fast_parse_answers_as_the_field_by_field_one(packets: list[bytes], local: bool) -> None:
    """`gro._parse` reads a packet that may merge with one struct call and leaves the rest to `_parse_any`:
    for every packet both give the same answer."""
    addresses = LOCAL[4] | LOCAL[6] if local else frozenset()
    for packet in packets:
        assert gro._parse(packet, addresses) == gro._parse_any(packet, addresses)
        assert gro._parse(memoryview(packet), addresses) == gro._parse_any(packet, addresses)
