"""The TUN queue's modes (`worker/tun_io.py`): the probe and its fallbacks, and reads/writes on a fake queue."""

from __future__ import annotations

import errno
import os

import pytest

from l3ptp.ipc.counters import Counters, DropReason
from l3ptp.worker import tun_io, vnet
from l3ptp.worker.tun_io import PLAIN, TunIO, TunMode, probe
from tests.support.fake_tun import FakeTun
from tests.support.packets import ipv4_tcp, ipv4_udp
from tests.unit.test_worker_offload import A4, B4, segments, super_packet

OFFLOAD = TunMode(True, True, "test")
FALLBACK = TunMode(True, False, "test")


def fake_ioctl(flags: int, offload_errno: int | None = None):
    calls = []

    def ioctl(fd: int, request: int, arg):
        calls.append(request)
        if request == tun_io.TUNGETIFF:
            return b"l3p-x".ljust(16, b"\0") + flags.to_bytes(2, "little") + bytes(22)
        assert request == tun_io.TUNSETOFFLOAD
        calls.append(arg)
        if offload_errno is not None:
            raise OSError(offload_errno, os.strerror(offload_errno))
        return 0
    return ioctl, calls


def test_probe_modes_and_fallbacks() -> None:
    ioctl, calls = fake_ioctl(0x1000 | 0x0001 | 0x0100)
    assert probe(3, ioctl) == PLAIN and calls == [tun_io.TUNGETIFF]  # no IFF_VNET_HDR: offloads never asked for
    ioctl, calls = fake_ioctl(0x5101)
    mode = probe(3, ioctl)
    assert (mode.vnet, mode.offload) == (True, True)
    assert calls == [tun_io.TUNGETIFF, tun_io.TUNSETOFFLOAD, tun_io.OFFLOADS]
    ioctl, calls = fake_ioctl(0x5101)  # offload = "gro": the kernel is asked for no offload, writes are coalesced
    mode = probe(3, ioctl, tso=False)
    assert (mode.vnet, mode.offload) == (True, True) and "GRO only" in mode.reason
    assert calls == [tun_io.TUNGETIFF, tun_io.TUNSETOFFLOAD, 0]
    ioctl, _ = fake_ioctl(0x5101, errno.EINVAL)  # a kernel or device refusing the offloads
    mode = probe(3, ioctl)
    assert (mode.vnet, mode.offload) == (True, False) and "TUNSETOFFLOAD refused" in mode.reason
    with FakeTun() as tun:  # not a TUN at all (the tests' fake): plain
        mode = probe(tun.worker_fd)
        assert (mode.vnet, mode.offload) == (False, False) and "not a TUN" in mode.reason


def make(tun: FakeTun, mode: TunMode) -> tuple[TunIO, Counters, list]:
    counters, written = Counters(), []
    return TunIO(tun.worker_fd, mode, counters, written.append), counters, written


def test_offload_reads_split_super_packets_and_count_bad_headers() -> None:
    data = os.urandom(5000)
    with FakeTun() as tun:
        io, counters, _ = make(tun, OFFLOAD)
        tun.inject(super_packet(4, data, 1200))
        tun.inject(vnet.PLAIN_HEADER + ipv4_udp(A4, B4, b"u"))
        tun.inject(b"\x01\x05" + bytes(30))  # UDP_L4 GSO: never offered, dropped and counted
        packets, lost = io.read_batch(64)
        assert lost is None
        assert packets == [*segments(4, data, 1200), ipv4_udp(A4, B4, b"u")]
        assert (io.gso_split, io.gso_segments) == (1, 5)
        assert counters.drops[DropReason.TUN_BAD_VNET] == 1 and counters.tun_rx_packets == 1


def test_offload_writes_are_coalesced_at_flush_and_counted_per_packet() -> None:
    packets = segments(4, os.urandom(3600), 1200, flags=0x10)
    with FakeTun() as tun:
        io, counters, written = make(tun, OFFLOAD)
        for p in packets:
            io.queue(p)
        assert tun.read_all() == []  # nothing before the flush
        io.write(ipv4_udp(A4, B4, b"icmp stands in"))  # the worker's own packets go at once
        io.flush()
        got = tun.read_all()
        assert got[0] == vnet.PLAIN_HEADER + ipv4_udp(A4, B4, b"icmp stands in")
        assert len(got) == 2 and vnet.split(got[1]) == packets
        assert (io.gro_writes, io.gro_merged) == (1, 3) and len(written) == 4


@pytest.mark.parametrize("mode", [FALLBACK, PLAIN], ids=["vnet-fallback", "plain"])
def test_without_offload_every_packet_is_written_alone_at_once(mode: TunMode) -> None:
    packets = segments(4, os.urandom(2400), 1200, flags=0x10)
    with FakeTun() as tun:
        io, _, written = make(tun, mode)
        for p in packets:
            io.queue(p)
        prefix = vnet.PLAIN_HEADER if mode.vnet else b""
        assert tun.read_all() == [prefix + p for p in packets] and written == packets
        tun.inject(prefix + ipv4_tcp(A4, B4, b"x"))
        assert io.read_batch(8) == ([ipv4_tcp(A4, B4, b"x")], None)
        assert io.gro_writes == io.gso_split == 0


def test_a_kernel_refusing_an_unflagged_super_packet_gets_its_packets_one_by_one(monkeypatch) -> None:
    """Coalesced for a local address (no NEEDS_CSUM): a kernel that answers EINVAL gets the same packets one by
    one, none lost, and from then on only super-packets the worker verified itself (NEEDS_CSUM)."""
    real, refused = os.writev, []

    def writev(fd: int, buffers: list) -> int:
        header = bytes(buffers[0])
        if header[1] and not header[0] & vnet.NEEDS_CSUM:  # a super-packet that leaves the check to the kernel
            refused.append(header)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, buffers)

    monkeypatch.setattr(tun_io.os, "writev", writev)
    first, second = segments(4, os.urandom(3600), 1200, flags=0x10), segments(4, os.urandom(3600), 1200, seq=9000,
                                                                              flags=0x10)
    with FakeTun() as tun:
        counters, written = Counters(), []
        io = TunIO(tun.worker_fd, OFFLOAD, counters, written.append, ("198.19.0.2/24",))  # B4: local
        for p in first:
            io.queue(p)
        io.flush()
        assert len(refused) == 1 and tun.read_all() == [vnet.PLAIN_HEADER + p for p in first]
        assert io.counters()["tun_gro_fallback"] == 1  # shown by `l3ptp status`
        for p in second:
            io.queue(p)
        io.flush()
        (merged,) = tun.read_all()
        assert merged[0] & vnet.NEEDS_CSUM and vnet.split(merged) == second and len(refused) == 1
        assert written == first + second and counters.total_drops() == 0


def test_a_failed_write_drops_every_packet_it_carried() -> None:
    packets = segments(4, os.urandom(2400), 1200, flags=0x10)
    with FakeTun() as tun:
        io, counters, written = make(tun, OFFLOAD)
        tun.host.close()
        for p in packets:
            io.queue(p)
        io.flush()
        assert counters.drops[DropReason.TUN_WRITE_ERROR] == 2 and written == [] and io.gro_writes == 0


def test_segments_past_the_batch_limit_wait_for_the_next_batch() -> None:
    """A batch holds at most `limit` packets, as with a plain TUN: the rest of a super-packet is carried over,
    not handed to the bounded queue toward QUIC at once (where it would be dropped as queue_full)."""
    data = os.urandom(12000)
    with FakeTun() as tun:
        io, _, _ = make(tun, OFFLOAD)
        tun.inject(super_packet(4, data, 1000))  # 12 segments
        tun.inject(vnet.PLAIN_HEADER + ipv4_udp(A4, B4, b"after"))
        first, _ = io.read_batch(5)
        second, _ = io.read_batch(5)
        third, _ = io.read_batch(5)
        assert first + second + third[:2] == segments(4, data, 1000) and len(first) == len(second) == 5
        assert third[2:] == [ipv4_udp(A4, B4, b"after")] and io.carry == []
