"""After writing packets from the peer into the TUN, the worker reads the TUN in the same wake-up: what the kernel
answered synchronously (an echo reply, a local TCP end's ACKs) goes out without a trip through the event loop.

A `Tunnel` with fakes around it (tests/unit/test_worker_drops.py): no network, no event loop runs. The kernel's
answer is put in the TUN queue before the datagram is handled, as it is by the time a real TUN write returns.
"""

from __future__ import annotations

import socket
from typing import Any

from l3ptp.worker.header import encode_datagram
from tests.support.packets import ipv4_udp
from tests.unit.test_worker_drops import PEER, FakeConn, FakeSock, _established, _tunnel, tun_pair  # noqa: F401

ECHO = ipv4_udp("198.19.0.1", "198.19.0.2", b"echo" * 20)  # from the peer's side to this host
REPLY = ipv4_udp("198.19.0.2", "198.19.0.1", b"reply" * 20)  # this host's answer


class DeliveringConn(FakeConn):
    """FakeConn whose every received datagram is one DATAGRAM frame (the whole payload)."""

    def __init__(self, events: Any) -> None:
        super().__init__()
        self._events_mod = events
        self._events: list[Any] = []

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self._events.append(self._events_mod.DatagramFrameReceived(data=data))

    def next_event(self) -> Any:
        return self._events.pop(0) if self._events else None


def _ready(sock: FakeSock, tun: socket.socket, *, reading: bool = True) -> Any:
    tunnel = _tunnel(sock, tun)
    _established(tunnel)
    tunnel.active.conn = DeliveringConn(tunnel.engine.events)
    tunnel._reading_tun = reading  # the TUN reader is registered (it is while the session is established)
    return tunnel


def _sent_packets(sock: FakeSock) -> list[bytes]:
    return [data[16:] for data, addr in sock.sent if addr == PEER]


def test_the_kernels_answer_to_a_written_packet_leaves_in_the_same_wake_up(tun_pair) -> None:  # noqa: F811
    sock = FakeSock()
    tunnel = _ready(sock, tun_pair[0])
    kernel = tun_pair[1]
    kernel.settimeout(2)
    kernel.send(REPLY)  # what the kernel has queued by the time the write of the echo returns
    sock.incoming.append((encode_datagram(2, 0, ECHO), PEER))
    tunnel._on_udp_readable()
    assert kernel.recv(2048) == ECHO  # written into the TUN
    assert _sent_packets(sock) == [REPLY]  # and the answer sent, before the loop would have run the TUN reader
    assert tunnel.counters.tun_rx_packets == 1 and tunnel.counters.dgram_tx_packets == 1


def test_a_wake_up_that_wrote_nothing_into_the_tun_does_not_read_it(tun_pair) -> None:  # noqa: F811
    sock = FakeSock()
    tunnel = _ready(sock, tun_pair[0])
    kernel = tun_pair[1]
    kernel.settimeout(2)
    kernel.send(REPLY)  # waiting for the TUN reader, as any packet from the host does
    sock.incoming.append((encode_datagram(99, 0, ECHO), PEER))  # an unknown context: dropped, nothing written
    tunnel._on_udp_readable()
    assert _sent_packets(sock) == [] and tunnel.counters.tun_rx_packets == 0
    tunnel._on_tun_readable()  # the loop's TUN reader takes it
    assert _sent_packets(sock) == [REPLY]


def test_the_tun_is_not_read_while_its_reader_is_stopped(tun_pair) -> None:  # noqa: F811
    sock = FakeSock()
    tunnel = _ready(sock, tun_pair[0], reading=False)
    kernel = tun_pair[1]
    kernel.settimeout(2)
    kernel.send(REPLY)
    sock.incoming.append((encode_datagram(2, 0, ECHO), PEER))
    tunnel._on_udp_readable()
    assert kernel.recv(2048) == ECHO
    assert _sent_packets(sock) == [] and tunnel.counters.tun_rx_packets == 0
