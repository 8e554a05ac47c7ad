"""No silent drop: what the tunnel does not send or take is a named counter in the worker's status report.

A `Tunnel` with fakes around it (socket, event loop, QUIC connection): no network, no event loop runs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import types
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.types import PeerRole
from l3ptp.worker.app import status_message
from l3ptp.worker.connections import Peer
from l3ptp.worker.core import PeerPolicy
from l3ptp.worker.engine import load_engine
from l3ptp.worker.policy import RESTART_HINT
from l3ptp.worker.session import State
from l3ptp.worker.tunnel import Tunnel
from l3ptp.worker.udp import UdpIO
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import make_config, new_keys

PEER = ("127.0.0.1", 4433)
STRANGER = ("127.0.0.9", 5555)


class FakeSock:
    """Receives what `incoming` holds, then EAGAIN; every send fails with `fail` (an errno) if set."""

    family = socket.AF_INET

    def __init__(self, fail: int | None = None) -> None:
        self.fail = fail
        self.incoming: deque[tuple[bytes, Any]] = deque()
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.fail is not None:
            raise OSError(self.fail, "refused")
        self.sent.append((bytes(data), addr))
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "empty")
        return self.incoming.popleft()

    def recvmsg(self, *a: Any) -> Any:
        raise BlockingIOError(errno.EAGAIN, "empty")  # the error queue (IP_RECVERR) is empty


class FakeLoop:
    def time(self) -> float:
        return 100.0

    def call_at(self, when: float, *a: Any) -> Any:
        return types.SimpleNamespace(cancel=lambda: None)

    def add_reader(self, *a: Any) -> None:
        return None

    def remove_reader(self, *a: Any) -> None:
        return None


class FakeConn:
    """Each DATAGRAM goes out in a UDP datagram of its own at the next transmit."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_datagram_frame(self, data: bytes) -> None:
        self.frames.append(data)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        out, self.frames = [(f, PEER) for f in self.frames], []
        return out

    def get_timer(self) -> float | None:
        return None


@pytest.fixture
def tun_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The TUN queue (the tunnel's end, the kernel's end): a SOCK_SEQPACKET pair like tests/support/fake_tun.py."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_blocking(a.fileno(), False)
    with a, b:
        yield a, b


def _tunnel(sock: FakeSock, tun: socket.socket) -> Tunnel:
    config = make_config(PeerRole.CONNECT, own=new_keys(), peer_fp=new_keys().fingerprint, port=PEER[1])
    engine = dataclasses.replace(load_engine(Engine.AIOQUIC), datagram_budget=lambda conn: 1300,
                                 queue_depth=lambda conn: 0, smoothed_rtt=lambda conn: 0.001)
    tunnel = Tunnel(config, tun.fileno(), sock, engine=engine)  # type: ignore[arg-type]
    tunnel.udp = UdpIO(sock, gso=False, gro=False)  # type: ignore[arg-type]
    tunnel._loop = FakeLoop()  # type: ignore[assignment]
    return tunnel


def _established(tunnel: Tunnel) -> None:
    session = types.SimpleNamespace(established=True, state=State.ESTABLISHED, next_deadline=lambda: 1e9,
                                    peer_fingerprint="")
    tunnel.active = Peer(FakeConn(), session, PEER, PeerPolicy(started_at=0.0, rekey_packets=10**9, rekey_at=1e9))
    tunnel.datapath.start_session(mtu=1280, max_payload=1300, tx_context_id=1, rx_context_id=2)


def _counters(tunnel: Tunnel) -> dict[str, int]:
    return status_message(tunnel.config, tunnel).counters


def test_udp_send_errors_reach_the_status_report(tun_pair) -> None:
    tunnel = _tunnel(FakeSock(fail=errno.ENOBUFS), tun_pair[0])
    assert _counters(tunnel)["udp_send_errors"] == 0
    assert tunnel.udp is not None
    tunnel.udp.send([(b"x" * 100, PEER), (b"y" * 100, PEER)])
    assert _counters(tunnel)["udp_send_errors"] == 2


def test_ignored_datagrams_and_a_strangers_restart_hint_reach_the_status_report(tun_pair) -> None:
    sock = FakeSock()
    tunnel = _tunnel(sock, tun_pair[0])
    sock.incoming.append((b"\x40" + bytes(40), STRANGER))  # a short-header packet no connection knows
    tunnel._on_udp_readable()
    assert _counters(tunnel)["udp_ignored"] == 1
    sock.incoming.append((RESTART_HINT, STRANGER))  # not from the active session's peer: ignored
    tunnel._on_udp_readable()
    assert _counters(tunnel)["udp_ignored"] == 2


@pytest.mark.parametrize("fail", [None, errno.ENOBUFS])
def test_tun_packets_whose_udp_send_fails_are_dropped_as_dgram_send_error(fail: int | None, tun_pair) -> None:
    sock = FakeSock(fail=fail)
    tunnel = _tunnel(sock, tun_pair[0])
    _established(tunnel)
    tun_peer = tun_pair[1]
    for i in range(3):
        tun_peer.send(ipv4_udp("198.19.0.2", "198.19.0.1", bytes([i]) * 100))
    tunnel._on_tun_readable()
    report = status_message(tunnel.config, tunnel)
    assert report.counters["dgram_tx_packets"] == 3
    if fail is None:
        assert len(sock.sent) == 3 and report.drops[DropReason.DGRAM_SEND_ERROR.value] == 0
    else:
        assert report.counters["udp_send_errors"] == 3
        assert report.drops[DropReason.DGRAM_SEND_ERROR.value] == 3


def test_datagrams_still_queued_when_a_connection_ends_are_dropped_as_dgram_lost_on_close(tun_pair) -> None:
    tunnel = _tunnel(FakeSock(), tun_pair[0])
    tunnel._queue_depth = lambda conn: 5  # five DATAGRAMs QUIC had not sent yet
    _established(tunnel)
    assert tunnel.active is not None
    tunnel.active.conn.datagrams_lost = 2  # qh3 emptied its queue of two when it failed
    tunnel._drop_peer(tunnel.active, "peer closed")
    assert status_message(tunnel.config, tunnel).drops[DropReason.DGRAM_LOST_ON_CLOSE.value] == 7
    assert tunnel.active is None
