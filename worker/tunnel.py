"""The worker's I/O shell: one UDP socket, one TUN fd, QUIC connections.

It moves bytes between the fds and the pure parts (`QuicConnection`,
`Session`, `Datapath`), reads the clock and arms one timer; the policy
decisions (candidates, reconnect backoff, key updates, probes, hints, their
deadlines) are `core.TunnelCore`'s, connection bookkeeping is
`connections.Connections`'s.

* UDP readable: receive until EAGAIN or UDP_RECV_BATCH datagrams (a GRO
  buffer counts as its segments, `udp.UdpIO`), each into
  ``receive_datagram``; then handle events; then ONE transmit.
* Transmit: ONE ``datagrams_to_send``, sent through `udp.UdpIO` (UDP GSO for
  runs of equal-size datagrams, ``sendto`` otherwise).
* TUN readable (only while ESTABLISHED): ``os.read`` until EAGAIN (at most
  TUN_READ_BATCH); ``Datapath.from_tun_batch``; ``send_datagram_frame`` each;
  ONE transmit.
* Connector: one connection at a time; after it ends, reconnect after an
  exponential backoff with jitter. Its socket asks for ICMP errors
  (IP_RECVERR): "port unreachable" from the peer (its worker died and the
  port is closed until the new one binds) starts a liveness probe, a QUIC
  PING that must be acknowledged within PROBE_TIMEOUT after the last such
  error; if it is not, the session is dropped and a new connection starts at
  once. A forged ICMP error costs one PING: a live peer acknowledges it.
  A listener that gets a short-header packet no connection of its own knows
  (the peer still talks to the worker it replaced) answers with
  RESTART_HINT, which starts the same probe.
* Listener: connection attempts become candidates (`connections.Connections`).

Counters live in one `Datapath` for the worker's lifetime, so they survive
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import structlog

from l3ptp.ipc.constants import KEY_UPDATE_INTERVAL, KEY_UPDATE_PACKETS, TUN_READ_BATCH, UDP_RECV_BATCH
from l3ptp.ipc.control_messages import SessionState, WorkerConfig
from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.types import PeerRole

from . import keys, native, reality_link
from .admission import Admission
from .connections import Connections, Peer, addr_text, session_params
from .core import TunnelCore
from .datapath import Datapath
from .renewal import Renewal
from .engine import EngineClasses, load_engine
from .steering import QueueGate, cid_source, pin_queue
from .policy import RESTART_HINT, normalize_ip
from .session import RoutesChanged, State
from .tun_io import TunIO, TunMode, probe
from .udp import UdpIO

__all__ = ["Tunnel", "TunnelStatus"]

IP_RECVERR, IPV6_RECVERR = 11, 25

RoutesCallback = Callable[[int, RoutesChanged], None]

log = structlog.get_logger("l3ptp.worker")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TunnelStatus:
    """What `Tunnel.status()` reports (the worker's status report adds the counters)."""

    state: SessionState
    #: "host:port" of the active connection's peer ("" without one).
    peer: str
    rtt_ms: float
    mtu: int
    queue_depth: int
    sessions: int
    key_updates: int
    last_error: str
    peer_key: str = ""  #: fingerprint of the key the active peer proved ("" before)


class Tunnel(QueueGate, Connections, Renewal):
    """Run the peer link of one worker queue until `stop`."""

    def __init__(
        self,
        config: WorkerConfig,
        tun_fd: int,
        udp_sock: socket.socket,
        *,
        engine: EngineClasses | None = None,
        on_routes: RoutesCallback | None = None,
        rng: random.Random | None = None,
        gso: bool = True,
        gro: bool = True,
        key_update_packets: int = KEY_UPDATE_PACKETS,
        key_update_interval: float = KEY_UPDATE_INTERVAL,
        tun_mode: TunMode | None = None,
    ) -> None:
        self.config = config
        self.tun_fd = tun_fd
        self.sock = udp_sock
        self.engine = pin_queue(engine or load_engine(config.engine), config.queue, config.queues)
        self._budget = self.engine.datagram_budget
        self._queue_depth = self.engine.queue_depth
        self._gso = gso
        self._gro = gro
        self.udp: UdpIO | None = None
        self.on_routes = on_routes
        self._rng = rng or random.SystemRandom()
        self.core = TunnelCore(random=self._rng.random, key_update_packets=key_update_packets,
                               key_update_interval=key_update_interval)
        self.datapath = Datapath(local_sources=config.local_sources, peer_sources=config.peer_sources)
        self.counters = self.datapath.counters
        self.tun = TunIO(tun_fd, tun_mode or probe(tun_fd, tso=config.tso), self.counters,  # offloads
                         self.datapath.written, config.tunnel_addresses)
        self._drops = self.counters.drops
        self._key = keys.private_key_from_raw(config.private_key)
        self._cert = keys.self_signed_certificate(self._key) if config.role is PeerRole.LISTEN else None
        self.params = session_params(config)
        self.active: Peer | None = None
        self.candidates: dict[tuple[Any, ...], Peer] = {}
        self.sessions = 0
        self.path_migrations = 0  #: times the active peer's address changed under one connection (roaming)
        self.peer_resolve_failures = 0  #: connector: its peer's name did not resolve (retried with the backoff)
        self._init_renewal()
        self.last_error = ""
        #: Received UDP datagrams no connection took (noise, a stranger's RESTART_HINT, refused attempts:
        #: these also count under their initial_* drop reason); reported as the counter `udp_ignored`.
        self.udp_ignored = 0
        self.state = SessionState.STARTING
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None
        #: The deadline `_timer` is armed for (uvloop returns a plain Handle, without `when()`, for one under 1 ms away).
        self._timer_when: float | None = None
        self._reading_tun = False
        self._stopped: asyncio.Event | None = None
        self._stop_requested = False
        #: Set when the tunnel ended itself (e.g. its TUN queue went away).
        self.exit_reason: str | None = None
        #: It ended on an exception while handling a received datagram (input
        #: from the network, not a local fault: see WorkerExiting.remote).
        self.exit_on_network_input = False
        self._peer_addr: tuple[Any, ...] | None = None
        self._peer_ip = normalize_ip(config.peer_address) if config.peer_address else None
        self._peer_is_name, self._resolving = bool(config.peer_address) and self._peer_ip is None, None  # connector
        #: Listener: where to send the start hints.
        self._start_hint: tuple[Any, ...] | None = None
        #: Source address text -> allowed (peer_address), for the few texts seen.
        self._ip_allowed: dict[str, bool] = {}
        #: QUIC configurations by is_client, each built once (its TLS
        #: certificate and key converted once, not per connection attempt).
        self._configs: dict[bool, Any] = {}
        self.admission = Admission(randbytes=cid_source(config)) if config.role is PeerRole.LISTEN else None
        #: REALITY listener: the gate before the engine and the camouflage relay (None: off).
        self.reality = reality_link.RealityListener(config, udp_sock) if self.admission and config.reality_key else None

    # ---- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Serve until `stop()`; the caller owns and closes the fds."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self._stop_requested:
            return
        self.sock.setblocking(False)
        self.udp = UdpIO(self.sock, gso=self._gso, gro=self._gro)
        os.set_blocking(self.tun_fd, False)
        log.info("tun_mode", vnet=self.tun.mode.vnet, offload=self.tun.mode.offload, reason=self.tun.mode.reason,
                 native=native.REASON)
        self._loop.add_reader(self.sock.fileno(), self._guarded, self._on_udp_readable)
        try:
            if self.config.role is PeerRole.CONNECT:
                for level, opt in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                    if level == socket.IPPROTO_IP or self.sock.family == socket.AF_INET6:
                        with contextlib.suppress(OSError):
                            self.sock.setsockopt(level, opt, 1)
                await self._resolve_and_connect()
            else:
                self.state = SessionState.CONNECTING
                if self.reality is not None:  # and no RESTART_HINTs: they would tell l3ptp apart
                    self.reality.start(self._loop)
                self._start_hint = self._last_peer() if self.reality is None else None
                if self._start_hint is not None:
                    self.core.start_hints()
                    self._send_start_hint(self._now())
            self._schedule()
            await self._stopped.wait()
        finally:
            self._loop.remove_reader(self.sock.fileno())
            if self.reality is not None:
                self.reality.stop()
            self._stop_tun()
            if self._timer is not None:
                self._timer.cancel()

    def _send_start_hint(self, now: float) -> None:
        """Tell the connector of our predecessor's session that a new worker listens here (it probes that
        session and reconnects): without this it would learn it only from its next packet to us, a
        keepalive up to `keepalive_interval` later when the tunnel is idle in its direction."""
        if self._start_hint is None or not self.core.start_hint(now):
            return
        with contextlib.suppress(OSError):
            self.sock.sendto(RESTART_HINT, self._start_hint)
        log.debug("start_hint_sent", peer=addr_text(self._start_hint))

    def stop(self, code: ErrorCode = ErrorCode.SHUTDOWN, reason: str = "shutdown") -> None:
        """Send CLOSE to the peer (if any), close QUIC and end `run`."""
        self.state = SessionState.STOPPED
        self._stop_requested = True
        self.core.stop()
        for peer in self._all_peers():
            self._apply(peer, peer.session.close(code, reason))
        if self._stopped is not None:
            self._stopped.set()

    # ---- status ------------------------------------------------------------

    @property
    def key_updates(self) -> int:
        """QUIC key updates this worker started (RFC 9001, 6)."""
        return self.core.key_updates

    @property
    def established(self) -> bool:
        return self.active is not None and self.active.session.established

    def status(self) -> TunnelStatus:
        peer = self.active
        rtt = 0.0
        addr = ""
        if peer is not None:
            rtt = max(0.0, self.engine.smoothed_rtt(peer.conn) * 1000.0)
            addr = f"{peer.addr[0]}:{peer.addr[1]}"
        return TunnelStatus(
            state=self.state,
            peer=addr,
            rtt_ms=rtt,
            mtu=self.datapath.mtu,
            queue_depth=self._queue_depth(peer.conn) if peer is not None else 0,
            sessions=self.sessions,
            key_updates=self.key_updates,
            last_error=self.last_error,
            peer_key=peer.session.peer_fingerprint if peer is not None else "",
        )

    # ---- connection setup --------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # ---- UDP ---------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        now = self._now()
        touched: dict[int, Peer] = {}
        assert self.udp is not None
        recv = self.udp.recv
        count = 0
        # Runs of consecutive datagrams for the same peer and address go to
        # the engine in one call (qh3: one trip into its core per run).
        runs: list[tuple[Peer, Any, list[bytes]]] = []
        while count < UDP_RECV_BATCH:
            try:
                datagrams, addr = recv()
            except (BlockingIOError, InterruptedError):
                if count == 0 and self._icmp_errors():  # woken by the error queue alone
                    self._probe(now, "icmp")
                break
            except OSError:
                # ICMP errors (ECONNREFUSED) surface here.
                self._icmp_errors()
                self._probe(now, "icmp")
                break
            count += len(datagrams)
            for data in datagrams:
                if data == RESTART_HINT:
                    if self.active is not None and addr == self.active.addr:
                        self._probe(now, "hint")
                    else:
                        self.udp_ignored += 1
                    continue
                peer = self._route(data, addr, now)
                if peer is None:
                    self.udp_ignored += 1
                    self._hint(data, addr, now)
                    continue
                if runs and runs[-1][0] is peer and runs[-1][1] == addr:
                    runs[-1][2].append(data)
                else:
                    runs.append((peer, addr, [data]))
                touched[id(peer)] = peer
        receive_many = self.engine.receive_many
        for peer, addr, batch in runs:
            receive_many(peer.conn, batch, addr, now)
        for peer in touched.values():
            self._process_events(peer)
        self.tun.flush()
        active = self.active
        if active is not None and self.core.key_update_due_by_packets(active.policy, self._packets_under_key()):
            self._update_keys(active, now)
        for peer in touched.values():
            self._transmit(peer)
        self._schedule()

    def _hint(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        """Listener: a short-header packet from the peer's address that no connection of ours knows (the
        peer still talks to our predecessor): tell it, at most every HINT_EVERY s (never larger than what came).
        Not for another queue's packet on a shared port: that connection is alive at its own worker."""
        if (self.config.role is PeerRole.LISTEN and self.reality is None and data and data[0] & 0xC0 == 0x40
                and len(data) >= len(RESTART_HINT) and not self._foreign(data)
                and (self._peer_ip is None or normalize_ip(addr[0]) == self._peer_ip) and self.core.restart_hint(now)):
            with contextlib.suppress(OSError):
                self.sock.sendto(RESTART_HINT, addr)
            log.debug("restart_hint_sent", peer=addr_text(addr))

    def _icmp_errors(self) -> int:
        """Drain the socket's error queue (IP_RECVERR); how many errors it held."""
        n = 0
        while n < UDP_RECV_BATCH:
            try:
                self.sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            n += 1
        return n

    def _probe(self, now: float, why: str) -> None:
        """The peer's port said unreachable (`why` "icmp") or a new worker there does not know us ("hint"):
        PING the active session, unless a probe runs already. A further ICMP error moves a running
        probe's deadline (the port is still closed: the new worker is still starting, an Initial now
        would be lost); a hint does not (a worker listens there now: reconnecting is what it waits for)."""
        peer = self.active
        if self.config.role is not PeerRole.CONNECT or peer is None or not peer.session.established:
            return
        changed, ping = self.core.probe(peer.policy, now, why, self.engine.smoothed_rtt(peer.conn))
        if ping is not None:
            peer.conn.send_ping(ping)
            self._transmit(peer)
            log.debug("probe_started", why=why)
        if changed:
            self._schedule()

    # ---- key updates -------------------------------------------------------

    def _packets_under_key(self) -> int:
        c = self.counters
        return c.dgram_tx_packets + c.dgram_rx_packets

    def _update_keys(self, peer: Peer, now: float) -> None:
        """New 1-RTT keys well before AES-GCM's confidentiality limit; neither
        engine does this on its own. Retried at the next check while the
        handshake is not yet confirmed."""
        self.core.key_updated(peer.policy, now, self._packets_under_key(), self.engine.update_keys(peer.conn))

    # ---- TUN ---------------------------------------------------------------

    def _start_tun(self) -> None:
        if not self._reading_tun and self._loop is not None:
            self._loop.add_reader(self.tun_fd, self._guarded, self._on_tun_readable)
            self._reading_tun = True

    def _stop_tun(self) -> None:
        if self._reading_tun and self._loop is not None:
            self._loop.remove_reader(self.tun_fd)
            self._reading_tun = False

    def _on_tun_readable(self) -> None:
        peer = self.active
        if peer is None or not peer.session.established:
            self._stop_tun()
            return
        packets, lost = self.tun.read_batch(TUN_READ_BATCH)  # super-packets split (TUN offloads)
        if lost is not None:
            self._tun_lost(lost)
            return
        if not packets:
            return
        conn = peer.conn
        self.datapath.set_budget(self._budget(conn))
        payloads = self.datapath.from_tun_batch(packets, self._queue_depth(conn))
        if self.datapath.to_tun:  # ICMP "too big" for oversize packets: back into the TUN
            for error in self.datapath.to_tun:
                self.tun.write(error)
            self.datapath.to_tun.clear()
        send = conn.send_datagram_frame
        for payload in payloads:
            send(payload)
        self.datapath.sent(payloads)
        if self.core.key_update_due_by_packets(peer.policy, self._packets_under_key()):
            self._update_keys(peer, self._now())
        assert self.udp is not None
        errors = self.udp.send_errors
        self._transmit(peer)
        if self.udp.send_errors > errors and payloads:  # the kernel refused UDP datagrams carrying them
            self.counters.drop(DropReason.DGRAM_SEND_ERROR, min(self.udp.send_errors - errors, len(payloads)))
        if self.tun.carry and self._loop is not None:  # the rest of a split super-packet: next, not dropped
            self._loop.call_soon(self._guarded, self._on_tun_readable)
        self._schedule()

    def _guarded(self, callback: Callable[[], None]) -> None:
        """Run an event-loop callback; an exception nobody foresaw (a bug, an engine failing in a new way)
        ends the worker with the reason instead of leaving it running half-updated: asyncio would log the
        traceback and carry on, with the transmit and the timer of that round skipped. The controller
        restarts the worker with a clean state."""
        try:
            callback()
        except Exception as exc:
            if self._loop is not None:
                self._loop.call_exception_handler(
                    {"message": f"l3ptp worker: internal error in {callback.__name__}", "exception": exc})
            if self.exit_reason is None:
                self.exit_reason = f"internal error in {callback.__name__}: {exc!r}"[:400]
                self.exit_on_network_input = callback == self._on_udp_readable
            try:
                self.stop(ErrorCode.INTERNAL, "internal error")
            except Exception:  # noqa: BLE001 - closing is best effort; ending is not
                self.state = SessionState.STOPPED
                self._stop_requested = True
                if self._stopped is not None:
                    self._stopped.set()

    def _tun_lost(self, why: str) -> None:
        """The queue fd is dead (EBADFD/EIO: the interface was deleted, e.g.
        by a restarted helper's reconcile). End the worker; the controller
        starts a new one with a fresh queue. Without this, a level-triggered
        error would spin the event loop."""
        self.exit_reason = f"TUN queue unusable: {why}"
        self.stop(ErrorCode.SHUTDOWN, self.exit_reason)

    def _write_tun(self, packet: memoryview) -> None:
        """A packet from the peer: written, or with TUN offloads queued to be coalesced (`tun.flush`)."""
        self.tun.queue(packet)

    # ---- timers ------------------------------------------------------------

    def _schedule(self) -> None:
        if self._loop is None or self.state is SessionState.STOPPED:
            return
        deadlines = []
        for peer in self._all_peers():
            t = peer.conn.get_timer()
            if t is not None:
                deadlines.append(t)
            deadlines.append(peer.session.next_deadline())
        active = self.active
        deadlines += self.core.deadlines(active.policy if active is not None else None,
                                         active is not None and active.session.established,
                                         [peer.policy for peer in self.candidates.values()]) + self._renewal_deadlines()
        when = min(deadlines) if deadlines else None
        if self._timer is not None and self._timer_when == when:
            return  # unchanged: no new handle, and no cancelled one left in the loop's timer heap
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = None if when is None else self._loop.call_at(when, self._guarded, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._now()
        for peer in self._all_peers():
            t = peer.conn.get_timer()
            if t is not None and t <= now:
                peer.conn.handle_timer(now=now)
                self._process_events(peer)
            if peer.session.state is not State.CLOSED:
                self._apply(peer, peer.session.tick(now))
            if self.core.candidate_expired(peer.policy, now) and peer.session.state is not State.CLOSED \
                    and peer is not self.active:
                self._apply(peer, peer.session.close(ErrorCode.DEAD_PEER, "no session within the candidate lifetime"))
            if peer is self.active and peer.session.established and self.core.key_update_due(
                    peer.policy, now, self._packets_under_key()):
                self._update_keys(peer, now)
            if peer.session.state is not State.CLOSED and self.core.probe_expired(peer.policy, now):
                log.debug("probe_failed")
                self._apply(peer, peer.session.close(ErrorCode.DEAD_PEER, "peer port unreachable, PING unanswered"))
                self.core.reconnect_now(now)  # at once: the peer's new worker is listening by now
            self._transmit(peer)
        if self.core.reconnect_due(now) and self.active is None:
            self._reconnect()
        if self.core.start_hint_due(now):
            self._send_start_hint(now)
        self._renewal_timer(now)
        self.tun.flush()
        self._schedule()
