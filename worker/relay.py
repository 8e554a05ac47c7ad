"""The camouflage relay of a listener (issue 15): the I/O shell around `reality_gate.RelayTable`.

Each unauthenticated sender the gate refuses becomes a relay flow: one
connected UDP socket towards the configured camouflage target, made here,
never towards anything else (the target comes from the configuration, not
from the sender: no open proxy). What the sender sends goes up that socket;
what the target answers comes back to the sender from the listener's own
socket, so the sender sees the target's handshake, certificate and content
on the listener's address. Flows, their rate and their idle time are bounded
by the table; every datagram not relayed is counted by its reason.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from .reality_gate import Action, RelayTable

__all__ = ["CamouflageRelay"]

_MAX_DATAGRAM = 65535
#: Datagrams read from one upstream socket per wake-up (the loop stays fair to the tunnel).
_READ_BUDGET = 64


class CamouflageRelay:
    def __init__(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int],
                 send_to_sender: Callable[[bytes, Any], None], table: RelayTable | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.loop, self.target, self.send_to_sender = loop, target, send_to_sender
        self.table = table or RelayTable()
        self.clock = clock or loop.time
        self.family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.socks: dict[Hashable, socket.socket] = {}
        #: relay_flows, relay_full, relay_rate_up, relay_rate_down, relay_socket_error, relay_up/down_packets
        self.counters: collections.Counter[str] = collections.Counter()

    def __contains__(self, sender: Hashable) -> bool:
        return sender in self.socks

    def up(self, sender: Hashable, datagrams: Iterable[bytes]) -> None:
        """Relay what `sender` sent to the target, opening its flow first if it has none."""
        now = self.clock()
        sock = self.socks.get(sender)
        if sock is None:
            if not self.table.open(sender, now):
                self.counters["relay_full"] += 1
                return
            try:
                sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                sock.connect(self.target)
            except OSError:
                self.counters["relay_socket_error"] += 1
                self.table.flows.pop(sender, None)
                return
            self.socks[sender] = sock
            self.loop.add_reader(sock.fileno(), self._down, sender, sock)
            self.counters["relay_flows"] += 1
        for data in datagrams:
            if not self.table.upstream(sender, len(data), now):
                self.counters["relay_rate_up"] += 1
                continue
            try:
                sock.send(data)
                self.counters["relay_up_packets"] += 1
            except OSError:  # ECONNREFUSED from an earlier ICMP, ENOBUFS...: the target's or the host's business
                self.counters["relay_socket_error"] += 1

    def _down(self, sender: Hashable, sock: socket.socket) -> None:
        now = self.clock()
        for _ in range(_READ_BUDGET):
            try:
                data = sock.recv(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                self.counters["relay_socket_error"] += 1
                return
            if not self.table.downstream(sender, len(data), now):
                self.counters["relay_rate_down"] += 1
                continue
            try:
                self.send_to_sender(data, sender)
                self.counters["relay_down_packets"] += 1
            except OSError:
                self.counters["relay_socket_error"] += 1

    def expire(self) -> int:
        """Close the flows idle past the table's limit; how many."""
        gone = self.table.expire(self.clock())
        for sender in gone:
            self._close(sender)
        return len(gone)

    def _close(self, sender: Hashable) -> None:
        sock = self.socks.pop(sender, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        for sender in list(self.socks):
            self._close(sender)
        self.table.flows.clear()


class Camouflage:
    """Everything a listener receives from senders that are not its authenticated peer: the REALITY gate
    first, then the relay (or silence, without a target). The shell gives it each datagram of a sender
    with no session or candidate; what it returns goes to the QUIC engine (only ever a sealed first flight
    and what followed it)."""

    def __init__(self, gate: Any, relay: CamouflageRelay | None) -> None:
        self.gate, self.relay = gate, relay
        #: refused_<reason> (senders sent to the camouflage or dropped), dropped_<reason> (datagrams), passed
        self.counters: collections.Counter[str] = collections.Counter()

    def datagram(self, sender: Hashable, data: bytes, now: float, wall_time: float) -> tuple[bytes, ...]:
        if self.relay is not None and sender in self.relay:
            self.relay.up(sender, (data,))
            return ()
        return self._decided(sender, self.gate.datagram(sender, data, now, wall_time))

    def _decided(self, sender: Hashable, d: Any) -> tuple[bytes, ...]:
        if d.action is Action.PASS:
            self.counters["passed"] += 1
            return tuple(d.datagrams)
        if d.action is Action.PENDING:
            return ()
        self.counters[f"refused_{d.reason}"] += 1
        if d.action is Action.RELAY and self.relay is not None:
            self.relay.up(sender, d.datagrams)
        else:
            self.counters["dropped_unauthenticated"] += len(d.datagrams)
        return ()

    def tick(self, now: float) -> None:
        for sender, d in self.gate.expire(now):
            self._decided(sender, d)
        if self.relay is not None:
            self.relay.expire()

    def status(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.relay is not None:
            out.update(self.relay.counters)
            out["relay_flows_open"] = len(self.relay.socks)
        out["pending_senders"] = len(self.gate)
        return out
