"""The worker's C module (worker/_fastpath.c) against its pure-Python reference, on the same outside input.

Each C function must give the reference's answer for every input, byte for byte: valid packets, packets with
one byte changed anywhere, random bytes, every length. The C functions read packets from peers and local
processes, so these are the tests that keep them honest; a C answer that differs is a bug in one of the two.
Where the C module is not built (no compiler), they skip, except in CI, where it must be built.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3ptp.ipc.counters import Counters, DropReason
from l3ptp.worker import datapath, gro, native, tun_io, vnet
from l3ptp.worker.datapath import Datapath
from l3ptp.worker.header import BadPacket, encode_datagram, pack_header, parse_header_untrusted
from l3ptp.worker.ippacket import _REASONS, Direction, PrefixSet, check_ip_untrusted
from l3ptp.worker.tun_io import TunIO, TunMode
from tests.fuzz.test_fuzz_offload import inputs as vnet_reads
from tests.fuzz.test_fuzz_offload import mutated, streams
from tests.support.fake_tun import FakeTun
from tests.support.packets import ipv4_icmp_echo, ipv4_tcp, ipv4_udp, ipv6_tcp, ipv6_udp
from tests.unit.test_worker_offload import LOCAL

try:
    from l3ptp.worker import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without a C compiler
    _fastpath = None

IN_CI = os.environ.get("L3PTP_REQUIRE_PRIVILEGED") == "1" or bool(os.environ.get("CI"))
needs_c = pytest.mark.skipif(_fastpath is None and not IN_CI, reason="the C module is not built here")

MANY = settings(max_examples=600, deadline=None)
U8 = st.integers(0, 0xFF)
U32 = st.integers(0, 0xFFFFFFFF)


def test_the_c_module_is_built_where_ci_runs() -> None:
    """CI builds the package with a compiler (make deps installs gcc): the worker must run the C path there."""
    if not IN_CI and _fastpath is None:
        pytest.skip("the C module is not built here")
    assert _fastpath is not None
    assert native.fastpath is _fastpath or os.environ.get("L3PTP_NATIVE") == "0"


def test_l3ptp_native_0_turns_the_c_module_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L3PTP_NATIVE", "0")
    assert native._load() == (None, "python (L3PTP_NATIVE=0)")
    monkeypatch.delenv("L3PTP_NATIVE")
    module, reason = native._load()
    assert (module, reason) == ((_fastpath, "c") if _fastpath is not None else (None, reason))


# ---- ones_sum -------------------------------------------------------------------------------------------------

@needs_c
@MANY
@given(st.one_of(st.binary(max_size=3000), st.builds(bytes, st.integers(0, 70)),
                 st.builds(lambda n: b"\xff" * n, st.integers(0, 300))))
def test_ones_sum(data: bytes) -> None:
    assert _fastpath.ones_sum(data) == vnet.py_ones_sum(data)
    assert _fastpath.ones_sum(memoryview(data)) == vnet.py_ones_sum(data)


# ---- gro_parse ------------------------------------------------------------------------------------------------

SLOW = object()


def reference_parse(packet: bytes | memoryview, local: frozenset[bytes], monkeypatch: pytest.MonkeyPatch) -> object:
    """gro._parse, with its hand-over to `_parse_any` seen as SLOW (the C function's False)."""
    with monkeypatch.context() as m:
        m.setattr(gro, "_parse_any", lambda *_: SLOW)
        return gro._parse(packet, local)


def tcp_segment(version: int, payload: bytes, flags: int, options: bytes, ident: int, ip_options: bytes) -> bytes:
    if version == 4:
        return ipv4_tcp("198.19.0.1", "198.19.0.2", payload, flags=flags, options=options, ident=ident,
                        ip_options=ip_options)
    return ipv6_tcp("fd00::1", "fd00::2", payload, flags=flags, options=options)


TS = b"\x01\x01\x08\x0a" + bytes(8)
segments_ = st.builds(tcp_segment, st.sampled_from([4, 6]), st.binary(max_size=1500),
                      st.sampled_from([0x10, 0x18, 0x11, 0x12, 0x19, 0x00, 0x30]),
                      st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), b"\x02\x04\x05\xb4"]),
                      st.integers(0, 0xFFFF), st.sampled_from([b"", b"\x01\x01\x01\x01"]))
parse_inputs = st.one_of(
    segments_,
    st.builds(mutated, segments_, st.integers(0, 1600), U8),
    st.binary(max_size=120),
    st.builds(lambda p, n: p[:n], segments_, st.integers(0, 80)),
)


@needs_c
@MANY
@given(st.lists(parse_inputs, min_size=1, max_size=6), st.booleans())
def test_gro_parse(packets: list[bytes], local: bool) -> None:
    addresses = LOCAL[4] | LOCAL[6] if local else frozenset()
    with pytest.MonkeyPatch.context() as monkeypatch:
        for packet in packets:
            want = reference_parse(packet, addresses, monkeypatch)
            for given_ in (packet, memoryview(packet)):
                got = _fastpath.gro_parse(given_, addresses)
                assert (SLOW if got is False else got) == want


@needs_c
@pytest.mark.parametrize("local", [False, True])
def test_gro_parse_every_byte_of_the_headers_changed(local: bool) -> None:
    """Deterministic, beside the random cases: each byte of the IP and TCP headers (and the first payload bytes)
    of real segments changed three ways, each answered as gro._parse answers it."""
    addresses = LOCAL[4] | LOCAL[6] if local else frozenset()
    bases = [tcp_segment(4, bytes(range(200)), 0x18, b"", 7, b""), tcp_segment(6, bytes(200), 0x10, TS, 0, b""),
             tcp_segment(4, bytes(60), 0x10, TS, 0xFFFF, b"\x01\x01\x01\x01")]
    with pytest.MonkeyPatch.context() as monkeypatch:
        for base in bases:
            for at in range(100):
                for flip in (0x01, 0x80, 0xFF):
                    packet = base[:at] + bytes([base[at] ^ flip]) + base[at + 1:]
                    got = _fastpath.gro_parse(packet, addresses)
                    assert (SLOW if got is False else got) == reference_parse(packet, addresses, monkeypatch), (at, flip)


@needs_c
@settings(max_examples=200, deadline=None)
@given(streams, st.booleans())
def test_coalesce_writes_the_same_with_the_c_parse(packets: list[bytes], local: bool) -> None:
    addresses = LOCAL[4] | LOCAL[6] if local else frozenset()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(gro, "_fast_parse", _fastpath.gro_parse)
        with_c = gro.coalesce(packets, addresses)
        monkeypatch.setattr(gro, "_fast_parse", gro._parse)
        without = gro.coalesce(packets, addresses)
    as_bytes = [([bytes(b) for b in buffers], carried) for buffers, carried in with_c]
    assert as_bytes == [([bytes(b) for b in buffers], carried) for buffers, carried in without]


# ---- tun_frame and peer_packet ---------------------------------------------------------------------------------

PREFIXES = [
    PrefixSet(["198.19.0.0/24", "fd00::/64"]),
    PrefixSet(["198.19.0.1/32", "fd00::1/128", "198.19.20.0/24"]),
    PrefixSet(["0.0.0.0/0", "::/0"]),
    PrefixSet([]),
]
ip_packets = st.one_of(
    st.builds(lambda src, payload: ipv4_icmp_echo(src, "198.19.0.2", payload=payload),
              st.sampled_from(["198.19.0.1", "198.19.7.9"]), st.binary(max_size=1400)),
    st.builds(ipv4_udp, st.just("198.19.0.1"), st.just("198.19.0.2"), st.binary(max_size=1400)),
    st.builds(ipv6_udp, st.sampled_from(["fd00::1", "fd00:1::1"]), st.just("fd00::2"), st.binary(max_size=1400)),
    segments_,
)
maybe_bad_ip = st.one_of(ip_packets, st.builds(mutated, ip_packets, st.integers(0, 60), U8),
                         st.binary(max_size=80), st.builds(lambda p, n: p[:n], ip_packets, st.integers(0, 60)))


@needs_c
@MANY
@given(maybe_bad_ip, st.integers(0, 2000), st.sampled_from(range(len(PREFIXES))), U32, U32)
def test_tun_frame(packet: bytes, limit: int, prefixes: int, context: int, sequence: int) -> None:
    allowed = PREFIXES[prefixes]
    reason = check_ip_untrusted(packet, mtu=limit, allowed_src=allowed, direction=Direction.FROM_TUN)
    got = _fastpath.tun_frame(packet, limit, allowed._v4, allowed._v6, context, sequence)
    if reason is None:
        assert got == encode_datagram(context, sequence, packet)
    else:
        assert type(got) is int and _REASONS[Direction.FROM_TUN][got] is reason


def reference_peer(payload: bytes, context: int, previous: int, mtu: int, sources: PrefixSet) -> object:
    try:
        got_context, sequence, _flags, _version, packet = parse_header_untrusted(payload)
    except BadPacket as exc:
        return exc.reason
    if got_context != context and got_context != previous:
        return DropReason.DGRAM_UNKNOWN_CONTEXT
    reason = check_ip_untrusted(packet, mtu=mtu, allowed_src=sources, direction=Direction.FROM_PEER)
    return reason if reason is not None else (bytes(packet), sequence)


def datagram(packet: bytes, context: int, sequence: int, flags: int, version: int | None, extra: bytes) -> bytes:
    ip_version = version if version is not None else (packet[0] >> 4 if packet else 4)
    header = struct.pack("!BBHIIBBH", 3, 1, 16 + len(extra), context, sequence, flags, ip_version, len(packet))
    return header + extra + packet


datagrams = st.one_of(
    st.builds(datagram, maybe_bad_ip, st.sampled_from([7, 8]), U32, U8, st.sampled_from([None, None, 4, 6, 5]),
              st.sampled_from([b"", b"", b"\0" * 4])),
    st.builds(mutated, st.builds(datagram, ip_packets, st.just(7), U32, st.just(0), st.just(None), st.just(b"")),
              st.integers(0, 20), U8),
    st.builds(lambda p: pack_header(7, 1, 4, len(p)) + p, st.binary(max_size=60)),
    st.binary(max_size=40),
)


@needs_c
@MANY
@given(datagrams, st.sampled_from([(7, -1), (8, 7), (9, -1)]), st.sampled_from([1280, 1500, 40, 0]),
       st.sampled_from(range(len(PREFIXES))))
def test_peer_packet(payload: bytes, contexts: tuple[int, int], mtu: int, prefixes: int) -> None:
    sources = PREFIXES[prefixes]
    want = reference_peer(payload, *contexts, mtu, sources)
    for given_ in (payload, memoryview(payload)):
        got = _fastpath.peer_packet(given_, *contexts, mtu, sources._v4, sources._v6)
        if isinstance(want, DropReason):
            assert type(got) is int and datapath._PEER_REASONS[got] is want
        else:
            assert isinstance(got[0], memoryview) and (bytes(got[0]), got[1]) == want


@needs_c
@settings(max_examples=150, deadline=None)
@given(st.lists(maybe_bad_ip, max_size=20), st.lists(datagrams, max_size=20), st.integers(0, 1400))
def test_the_datapath_counts_and_forwards_the_same_with_and_without_c(tun: list[bytes], peer: list[bytes],
                                                                      budget: int) -> None:
    """Whole `Datapath` runs (queue limit, oversize fragments and ICMP, counters, sequence) agree."""
    def run(c: bool) -> tuple[object, ...]:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(datapath, "_tun_frame", _fastpath.tun_frame if c else None)
            monkeypatch.setattr(datapath, "_peer_packet", _fastpath.peer_packet if c else None)
            dp = Datapath(local_sources=["198.19.0.0/24", "fd00::/64"], peer_sources=["198.19.0.0/16", "fd00::/16"],
                          queue_max=12, clock=lambda: 0.0)
            dp.peer_v4 = bytes([198, 19, 0, 2])
            dp.start_session(mtu=1280, max_payload=budget + 16, tx_context_id=7, rx_context_id=7,
                             peer_addresses=["198.19.0.2/24", "fd00::2/64"])
            out = dp.from_tun_batch(tun, queue_depth=3)
            received = [dp.from_peer(p) for p in peer]
            received = [bytes(p) if p is not None else None for p in received]
            return (out, received, list(dp.to_tun), dp.fragmented, dp.counters.snapshot(),
                    dp.counters.rx_sequence.expected)
    assert run(True) == run(False)


# ---- tun_read -----------------------------------------------------------------------------------------------------

def read_all(reads: list[bytes], mode: TunMode, c: bool, limit: int) -> tuple[object, ...]:
    with pytest.MonkeyPatch.context() as monkeypatch, FakeTun() as tun:
        monkeypatch.setattr(tun_io, "_tun_read", _fastpath.tun_read if c else None)
        counters = Counters()
        io = TunIO(tun.worker_fd, mode, counters, lambda _: None)
        for r in reads:
            tun.inject(r)
        batches = []
        for _ in range(len(reads) * 2 + 2):
            got, lost = io.read_batch(limit)
            batches.append((got, lost))
            if lost or (not got and not io.carry):
                break
        return batches, io.counters(), counters.tun_rx_packets, dict(counters.drops)


@needs_c
@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(vnet_reads, st.builds(lambda p: bytes(10) + p, ip_packets), st.just(b"")), max_size=10),
       st.sampled_from([1, 3, 64]), st.booleans())
def test_tun_reads_are_the_same_with_and_without_c(reads: list[bytes], limit: int, vnet_mode: bool) -> None:
    """Batches, what they carry over, what they refuse and count, an end of file (an empty read) included."""
    mode = TunMode(True, True, "fuzz") if vnet_mode else TunMode(False, False, "fuzz")
    assert read_all(reads, mode, True, limit) == read_all(reads, mode, False, limit)


@needs_c
@pytest.mark.parametrize("vnet_mode", [True, False])
def test_tun_reads_with_every_header_byte_set(vnet_mode: bool) -> None:
    """Deterministic: a real packet behind a virtio_net_hdr with each of its 10 bytes set three ways (and the
    plain header), read in batches of 1 and 64; one read per header, so each answer is the reference's."""
    packet = ipv4_tcp("198.19.0.1", "198.19.0.2", bytes(300), flags=0x18)
    reads = [bytes(10) + packet, bytes(10)]
    for at in range(10):
        for value in (0x01, 0x04, 0xFF):
            reads.append(bytes(at) + bytes([value]) + bytes(9 - at) + packet)
    mode = TunMode(True, True, "fuzz") if vnet_mode else TunMode(False, False, "fuzz")
    for limit in (1, 64):
        assert read_all(reads, mode, True, limit) == read_all(reads, mode, False, limit)


@needs_c
@pytest.mark.parametrize("c", [True, False])
@pytest.mark.parametrize("segments", [3, 2])
def test_a_batch_never_holds_more_than_its_limit(c: bool, segments: int) -> None:
    """A super-packet of 3 segments fills a batch of 3; one of 2 leaves room for one packet more. Either way the
    plain packets behind it go to the next batch, never past the limit (found by the random test above: the C
    loop once read a fourth packet into a batch of 3)."""
    from tests.unit.test_worker_offload import super_packet

    plain = [ipv4_udp("198.19.0.1", "198.19.0.2", bytes([i])) for i in range(2)]
    reads = [super_packet(4, bytes(2 * segments), 2), *(bytes(10) + p for p in plain)]
    batches = [got for got, _ in read_all(reads, TunMode(True, True, "fuzz"), c, 3)[0]]
    assert batches == ([batches[0], plain, []] if segments == 3 else [batches[0], plain[1:], []])
    assert len(batches[0]) == 3 and (segments == 3 or batches[0][2] == plain[0])


@needs_c
def test_a_failed_read_reports_the_same_error() -> None:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for c in (True, False):
            with pytest.MonkeyPatch.context() as monkeypatch:
                monkeypatch.setattr(tun_io, "_tun_read", _fastpath.tun_read if c else None)
                io = TunIO(fd, TunMode(False, False, "fuzz"), Counters(), lambda _: None)
                assert io.read_batch(8) == ([], os.strerror(21))  # EISDIR
    finally:
        os.close(fd)


@needs_c
def test_tun_read_refuses_absurd_sizes() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        for size in (0, 10, 1 << 21):
            with pytest.raises(ValueError, match="size"):
                _fastpath.tun_read(b.fileno(), size, 4, True)
        with pytest.raises(ValueError):
            _fastpath.tun_read(b.fileno(), 2000, -1, False)
