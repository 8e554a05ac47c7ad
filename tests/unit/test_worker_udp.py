"""UDP GSO/GRO batching: the pure grouping/splitting and a loopback round trip."""

from __future__ import annotations

import errno
import select
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l3ptp.worker.udp import UdpIO, gro_segment_size, plan_sends, split_gro, SOL_UDP, UDP_GRO, UDP_SEGMENT

A = ("127.0.0.1", 1)
B = ("127.0.0.1", 2)


def _d(size: int, addr: Any = A, fill: int = 0) -> tuple[bytes, Any]:
    return bytes([fill]) * size, addr


def test_equal_sizes_to_one_address_form_one_group() -> None:
    groups = plan_sends([_d(1350) for _ in range(5)])
    assert [(a, s, len(g)) for a, s, g in groups] == [(A, 1350, 5)]


def test_a_shorter_datagram_ends_the_group() -> None:
    groups = plan_sends([_d(1350), _d(1350), _d(200), _d(1350), _d(1350)])
    assert [(s, [len(x) for x in g]) for _, s, g in groups] == [(1350, [1350, 1350, 200]), (1350, [1350, 1350])]


def test_a_longer_datagram_or_another_address_starts_a_new_group() -> None:
    groups = plan_sends([_d(100), _d(1350), _d(1350, B), _d(1350, B), _d(1350)])
    assert [(a, s, len(g)) for a, s, g in groups] == [(A, 100, 1), (A, 1350, 1), (B, 1350, 2), (A, 1350, 1)]


def test_limits_on_segments_and_bytes() -> None:
    assert [len(g) for _, _, g in plan_sends([_d(10)] * 10, max_segments=4)] == [4, 4, 2]
    assert [len(g) for _, _, g in plan_sends([_d(1000)] * 10, max_bytes=3500)] == [3, 3, 3, 1]
    assert [len(g) for _, _, g in plan_sends([_d(5000)] * 2, max_bytes=3500)] == [1, 1]


@given(st.lists(st.tuples(st.integers(0, 1600), st.sampled_from([A, B])), max_size=120),
       st.integers(1, 70), st.integers(1, 70_000))
def test_plan_keeps_order_and_obeys_the_gso_rules(items: list[tuple[int, Any]], max_segments: int,
                                                  max_bytes: int) -> None:
    datagrams = [(i.to_bytes(2, "big") * (n // 2) + b"x" * (n % 2), addr) for i, (n, addr) in enumerate(items)]
    groups = plan_sends(datagrams, max_segments=max_segments, max_bytes=max_bytes)
    flat = [(d, addr) for addr, _, g in groups for d in g]
    assert flat == datagrams
    for addr, size, g in groups:
        assert len(g[0]) == size
        if len(g) > 1:
            assert len(g) <= max_segments and sum(map(len, g)) <= max_bytes
            assert all(len(d) == size for d in g[:-1]) and 0 < len(g[-1]) <= size


@given(st.binary(min_size=1, max_size=5000), st.integers(1, 6000))
def test_split_gro_inverts_concatenation(buf: bytes, seg: int) -> None:
    parts = split_gro(buf, seg)
    assert b"".join(parts) == buf
    assert all(len(p) == seg for p in parts[:-1]) and 0 < len(parts[-1]) <= seg


def test_gro_segment_size_reads_the_cmsg() -> None:
    assert gro_segment_size([(SOL_UDP, UDP_GRO, (1350).to_bytes(4, "little"))]) == 1350
    assert gro_segment_size([(socket.SOL_SOCKET, 1, b"\0" * 4)]) == 0
    assert gro_segment_size([]) == 0


# ---- shell ---------------------------------------------------------------------


class _FakeSock:
    """Records sends; sendmsg fails with `fail` (an errno) once set."""

    def __init__(self, fail: int | None) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes, Any]] = []
        self.gso_calls = 0

    def getsockopt(self, *a: Any) -> int:
        return 0

    def setsockopt(self, *a: Any) -> None:
        return None

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)

    def sendmsg(self, bufs: list[bytes], anc: list[Any], flags: int, addr: Any) -> int:
        self.gso_calls += 1
        if self.fail is not None:
            raise OSError(self.fail, "nope")
        ((level, kind, data),) = anc
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        seg = int.from_bytes(data, "little")
        self.sent += [(p, addr) for p in split_gro(b"".join(bufs), seg)]
        return sum(map(len, bufs))


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP])
def test_gso_failure_disables_gso_and_resends_one_by_one(err: int) -> None:
    sock = _FakeSock(err)
    io = UdpIO(sock)  # type: ignore[arg-type]
    assert io.gso
    batch = [_d(1350, fill=i) for i in range(6)] + [_d(100, fill=9)]
    io.send(batch)
    assert sock.sent == batch and not io.gso and io.send_errors == 0
    io.send(batch)
    assert sock.gso_calls == 1 and sock.sent == batch * 2


def test_gso_send_other_errors_count_the_group_lost() -> None:
    sock = _FakeSock(errno.ENOBUFS)
    io = UdpIO(sock)  # type: ignore[arg-type]
    io.send([_d(1350)] * 4)
    assert io.gso and io.send_errors == 4 and sock.sent == []


def test_gso_groups_are_sent_in_order() -> None:
    sock = _FakeSock(None)
    io = UdpIO(sock)  # type: ignore[arg-type]
    batch = [_d(1350, A, 1), _d(1350, A, 2), _d(1350, B, 3), _d(80, B, 4), _d(1350, A, 5)]
    io.send(batch)
    assert sock.sent == batch and sock.gso_calls == 2 and io.gso_segments == 4


def _pair(gro: bool) -> tuple[socket.socket, socket.socket]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    return tx, rx


def _drain(io: UdpIO, want: int) -> tuple[list[bytes], int]:
    got: list[bytes] = []
    calls = 0
    while len(got) < want:
        if not select.select([io.sock], [], [], 2.0)[0]:
            break
        while True:
            try:
                parts, _ = io.recv()
            except BlockingIOError:
                break
            calls += 1
            got += parts
    return got, calls


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_loopback_gso_send_arrives_as_the_same_datagrams(gro: bool) -> None:
    """N equal segments + a short tail sent with GSO arrive as N+1 datagrams, in order.

    With GRO on, the kernel may deliver them as one buffer that `recv` splits.
    """
    tx, rx = _pair(gro)
    try:
        sender = UdpIO(tx, gro=False)
        receiver = UdpIO(rx, gro=gro)
        if not sender.gso:
            pytest.skip("kernel without UDP GSO")
        dest = rx.getsockname()
        batch = [(i.to_bytes(2, "big") * 600, dest) for i in range(20)] + [(b"tail", dest)]
        sender.send(batch)
        assert sender.gso_sends == 1 and sender.gso_segments == 21 and sender.gso
        got, calls = _drain(receiver, len(batch))
        assert got == [d for d, _ in batch]
        if gro and receiver.gro:
            # Loopback hands the GSO packet to a GRO socket whole (Linux >= 5.0).
            assert calls < len(batch) and receiver.gro_buffers >= 1
        else:
            assert calls == len(batch)
    finally:
        tx.close()
        rx.close()
