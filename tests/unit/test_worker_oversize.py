"""ICMP "too big" errors for oversize packets from the TUN (worker/icmp.py, Datapath)."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l3ptp.ipc.counters import DropReason
from l3ptp.worker.datapath import ICMP_TOO_BIG_RATE, Datapath
from l3ptp.worker.header import HEADER_LEN
from l3ptp.worker.oversize import _checksum, fragment_v4, too_big
from l3ptp.worker.ippacket import PrefixSet
from tests.support.packets import internet_checksum, ipv4, ipv4_icmp_echo, ipv4_udp, ipv6, ipv6_icmp_echo, ipv6_udp

LOCAL = PrefixSet(["198.19.0.1/32", "fd00::1/128"])
PEER4 = ipaddress.ip_address("198.19.0.2").packed
PEER6 = ipaddress.ip_address("fd00::2").packed


def _v4(**kw):
    return ipv4_udp("198.19.0.1", "198.19.0.2", b"x" * 1400, **kw)


def test_checksum_matches_rfc1071_on_any_buffer() -> None:
    for n in (0, 1, 2, 3, 20, 57, 1500):
        for _ in range(20):
            data = os.urandom(n)
            assert _checksum(data) == internet_checksum(data)
    assert _checksum(bytes(8)) == internet_checksum(bytes(8)) == 0xFFFF
    assert _checksum(b"\xff\xff") == internet_checksum(b"\xff\xff") == 0


def test_ipv4_fragmentation_needed_for_a_df_packet() -> None:
    packet = _v4(df=True)
    error = too_big(packet, 1280, LOCAL, PEER4, PEER6)
    assert error is not None
    ihl = (error[0] & 0x0F) * 4
    assert error[0] >> 4 == 4 and ihl == 20 and internet_checksum(error[:20]) == 0
    total, proto = struct.unpack_from("!2xH5xB", error)
    assert total == len(error) <= 576 and proto == 1
    assert error[12:16] == PEER4 and error[16:20] == packet[12:16]  # from the peer, to the sender
    icmp = error[20:]
    assert internet_checksum(icmp) == 0
    assert icmp[0] == 3 and icmp[1] == 4 and struct.unpack_from("!H", icmp, 6)[0] == 1280
    assert icmp[8:] == packet[:len(icmp) - 8] and len(icmp) - 8 >= 28  # the header and more than 8 bytes


def test_ipv6_packet_too_big() -> None:
    packet = ipv6_udp("fd00::1", "fd00::2", b"y" * 1400)
    error = too_big(packet, 1280, LOCAL, PEER4, PEER6)
    assert error is not None and len(error) <= 1280
    payload_length, next_header, hop_limit = struct.unpack_from("!4xHBB", error)
    assert error[0] >> 4 == 6 and next_header == 58 and hop_limit == 64 and payload_length == len(error) - 40
    assert error[8:24] == PEER6 and error[24:40] == packet[8:24]
    icmp = error[40:]
    pseudo = PEER6 + packet[8:24] + struct.pack("!I3xB", len(icmp), 58)
    assert internet_checksum(pseudo + icmp) == 0
    assert icmp[0] == 2 and icmp[1] == 0 and struct.unpack_from("!I", icmp, 4)[0] == 1280
    assert icmp[8:] == packet[:len(icmp) - 8]


@pytest.mark.parametrize("case", ["no df", "foreign source", "bad length", "icmp error", "no peer address",
                                  "v6 icmp error", "v6 foreign source", "not ip"])
def test_no_error_is_due(case: str) -> None:
    peer4: bytes | None = PEER4
    if case == "no df":
        packet = _v4()
    elif case == "foreign source":
        packet = ipv4_udp("198.19.0.9", "198.19.0.2", b"x" * 1400, df=True)
    elif case == "bad length":
        packet = _v4(df=True)[:-1]
    elif case == "icmp error":  # destination unreachable about something else
        packet = ipv4("198.19.0.1", "198.19.0.2", 1, b"\x03\x01" + bytes(1400), df=True)
    elif case == "no peer address":
        packet, peer4 = _v4(df=True), None
    elif case == "v6 icmp error":  # destination unreachable (type 1)
        packet = ipv6("fd00::1", "fd00::2", 58, b"\x01\x00" + bytes(1400))
    elif case == "v6 foreign source":
        packet = ipv6_udp("fd00::9", "fd00::2", b"y" * 1400)
    else:
        packet = b"\x50" + bytes(1400)
    assert too_big(packet, 1280, LOCAL, peer4, PEER6) is None


@pytest.mark.parametrize("size", [0, 1, 19, 20, 39, 40, 41])
def test_short_or_empty_packets_never_raise(size: int) -> None:
    for first in (0x45, 0x60, 0x4F):
        packet = bytes([first]) + bytes(max(0, size - 1)) if size else b""
        assert too_big(packet, 1280, PrefixSet(["0.0.0.0/0", "::/0"]), PEER4, PEER6) is None


def test_a_v6_header_alone_claiming_icmpv6_never_raises() -> None:
    packet = bytearray(40)
    packet[0], packet[6], packet[8] = 0x60, 58, 0xFD  # payload length 0, next header ICMPv6
    assert too_big(bytes(packet), 1280, PrefixSet(["::/0"]), PEER4, PEER6) is None


@given(st.binary(max_size=1600), st.sampled_from([0x45, 0x46, 0x60, 0x4F, 0x00]))
def test_any_bytes_never_raise(tail: bytes, first: int) -> None:
    too_big(bytes([first]) + tail, 1280, PrefixSet(["0.0.0.0/0", "::/0"]), PEER4, PEER6)


def test_echo_requests_do_get_an_error() -> None:
    v4 = ipv4_icmp_echo("198.19.0.1", "198.19.0.2", payload=bytes(1400))
    v4 = v4[:6] + b"\x40\x00" + v4[8:]  # DF
    v4 = v4[:10] + b"\0\0" + v4[12:]
    v4 = v4[:10] + struct.pack("!H", internet_checksum(v4[:20])) + v4[12:]
    assert too_big(v4, 1280, LOCAL, PEER4, PEER6) is not None
    assert too_big(ipv6_icmp_echo("fd00::1", "fd00::2", payload=bytes(1400)), 1280, LOCAL, PEER4, PEER6) is not None


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_datapath_writes_back_errors_rate_limited_and_still_counts_the_drop() -> None:
    clock = _Clock()
    dp = Datapath(local_sources=["198.19.0.1/32"], peer_sources=["198.19.0.2/32"], clock=clock)
    dp.start_session(mtu=1280, max_payload=1280 + HEADER_LEN, tx_context_id=1, rx_context_id=2,
                     peer_addresses=["198.19.0.2/24", "fd00::2/64"])
    big = _v4(df=True)
    n = int(ICMP_TOO_BIG_RATE) + 50
    assert dp.from_tun_batch([big] * n, 0) == []
    assert dp.counters.drops[DropReason.TUN_OVERSIZE] == n
    assert len(dp.to_tun) == dp.icmp_too_big_sent == ICMP_TOO_BIG_RATE  # the burst, no more
    assert dp.to_tun[0] == too_big(big, 1280, dp.local_sources, PEER4, PEER6)
    dp.to_tun.clear()
    clock.now += 0.25
    dp.from_tun_batch([big] * n, 0)
    assert len(dp.to_tun) == ICMP_TOO_BIG_RATE * 0.25


# ---- IPv4 fragmentation (DF clear) ------------------------------------------------


def _reassemble(fragments: list[bytes]) -> tuple[bytes, list[tuple[int, bool, int]]]:
    """(payload, [(offset in bytes, more fragments, total length)]) of IPv4 fragments, checked."""
    parts, meta = {}, []
    for f in fragments:
        assert internet_checksum(f[:20]) == 0
        total, frag = struct.unpack_from("!2xH2xH", f)
        assert total == len(f)
        offset, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
        assert not frag & 0x4000
        parts[offset] = f[20:]
        meta.append((offset, more, total))
    payload = b"".join(parts[k] for k in sorted(parts))
    return payload, meta


def test_fragments_fit_the_limit_and_reassemble_exactly() -> None:
    packet = _v4()  # 1428 bytes, DF clear
    pieces = fragment_v4(packet, 1280, LOCAL)
    assert pieces is not None and len(pieces) == 2
    assert all(len(p) <= 1280 for p in pieces)
    payload, meta = _reassemble(pieces)
    assert payload == packet[20:]
    assert [(o, m) for o, m, _ in meta] == [(0, True), (1256, False)]  # 1260 - 20 rounded down to 8
    for p in pieces:  # same identity: id, protocol, addresses, TTL
        assert p[4:6] == packet[4:6] and p[8:10] == packet[8:10] and p[12:20] == packet[12:20]


def test_a_fragment_is_fragmented_again_keeping_its_offset_and_more_flag() -> None:
    packet = bytearray(_v4())
    struct.pack_into("!H", packet, 6, 0x2000 | 100)  # MF, offset 800 bytes
    struct.pack_into("!H", packet, 10, 0)
    struct.pack_into("!H", packet, 10, internet_checksum(bytes(packet[:20])))
    pieces = fragment_v4(bytes(packet), 600, LOCAL)
    assert pieces is not None
    _payload, meta = _reassemble(pieces)
    assert meta[0][0] == 800 and all(m for _, m, _ in meta)  # the last one keeps MF: more follow elsewhere


@pytest.mark.parametrize("case", ["df", "options", "foreign source", "bad length", "v6"])
def test_not_fragmented(case: str) -> None:
    packet = {
        "df": lambda: _v4(df=True),
        "options": lambda: ipv4("198.19.0.1", "198.19.0.2", 17, bytes(1400), options=b"\x01\x01\x01\x01"),
        "foreign source": lambda: ipv4_udp("198.19.0.9", "198.19.0.2", b"x" * 1400),
        "bad length": lambda: _v4()[:-1],
        "v6": lambda: ipv6_udp("fd00::1", "fd00::2", b"y" * 1400),
    }[case]()
    assert fragment_v4(packet, 1280, LOCAL) is None


def test_datapath_sends_fragments_instead_of_dropping() -> None:
    dp = Datapath(local_sources=["198.19.0.1/32"], peer_sources=["198.19.0.2/32"])
    dp.start_session(mtu=1280, max_payload=1280 + HEADER_LEN, tx_context_id=1, rx_context_id=2,
                     peer_addresses=["198.19.0.2/24"])
    out = dp.from_tun_batch([_v4(), ipv4_udp("198.19.0.1", "198.19.0.2", b"after")], 0)
    assert len(out) == 3 and dp.fragmented == 1 and dp.counters.total_drops() == 0 and dp.to_tun == []
    assert out[2][HEADER_LEN:] == ipv4_udp("198.19.0.1", "198.19.0.2", b"after")
    assert [len(p) - HEADER_LEN <= 1280 for p in out] == [True] * 3
    payload, _ = _reassemble([p[HEADER_LEN:] for p in out[:2]])
    assert payload == _v4()[20:]
    full = Datapath(local_sources=["198.19.0.1/32"], peer_sources=[], queue_max=1)
    full.start_session(mtu=1280, max_payload=1280 + HEADER_LEN, tx_context_id=1, rx_context_id=2)
    assert full.from_tun_batch([_v4()], 0) == [] and full.counters.drops[DropReason.QUEUE_FULL] == 1
