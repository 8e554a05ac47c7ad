"""The worker's I/O shell: one UDP socket, one TUN fd, QUIC connections.

It moves bytes between the fds and the pure parts (`QuicConnection`,
`Session`, `Datapath`) and arms one timer; protocol decisions live in the
pure modules.

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
  RESTART_HINT, which starts the same probe. Listener: a QUIC Initial from a new
  address (or a new Initial from the current peer's address, i.e. a peer
  restarted on the same port) is a connection attempt; `admission.Admission`
  decides whether it starts a candidate connection, gets a stateless Retry
  (under load) or is dropped, within budgets. A candidate that becomes
  ESTABLISHED replaces the active session. At most MAX_CANDIDATES candidates
  exist at once, each for at most CANDIDATE_LIFETIME seconds. The QUIC
  configuration (TLS certificate and key included) is built once per worker.

Counters live in one `Datapath` for the worker's lifetime, so they survive
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import structlog

from l3ptp.ipc.codec import StreamDecoder, frame
from l3ptp.ipc.constants import (
    ALPN,
    AUTH_NONCE_LEN,
    CANDIDATE_DATAGRAMS_MAX,
    CANDIDATE_LIFETIME,
    KEY_UPDATE_INTERVAL,
    KEY_UPDATE_PACKETS,
    MAX_CANDIDATES,
    MAX_DATAGRAM_FRAME_SIZE,
    QUIC_IDLE_TIMEOUT,
    RECONNECT_BACKOFF_MAX,
    RECONNECT_BACKOFF_MIN,
    TUN_READ_BATCH,
    UDP_RECV_BATCH,
)
from l3ptp.ipc.control_messages import SessionState, WorkerConfig
from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.errors import DecodeError, ErrorCode
from l3ptp.ipc.peer_messages import PEER_CONTROL
from l3ptp.ipc.types import PeerRole

from . import keys
from .admission import Admission, has_token
from .datapath import Datapath
from .engine import EngineClasses, load_engine
from .ippacket import PrefixSet
from .session import Closed, Established, RoutesChanged, Send, Session, SessionParams, State
from .udp import UDP_MAX, UdpIO

__all__ = ["Tunnel"]

#: Seconds a liveness probe waits for its PING's ACK after the last ICMP error (plus 3 RTTs).
PROBE_TIMEOUT = 0.15
#: "Unknown connection" hint a listener sends back for a short-header packet it has no connection for
#: (a restarted worker): shaped as a QUIC Version Negotiation packet with no CIDs, which no QUIC stack
#: accepts after the handshake; the connector answers it with a liveness probe. At most one per HINT_EVERY s.
RESTART_HINT = bytes([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])  # version 0, no DCID/SCID, "supports" QUIC v1
HINT_EVERY = 0.1
#: RESTART_HINTs a new listener sends at start to the peer its predecessor last reported
#: (`WorkerConfig.last_peer`), HINT_EVERY s apart, until a connection attempt arrives.
START_HINTS = 3
IP_RECVERR, IPV6_RECVERR = 11, 25
_SERVER_NAME = "l3ptp"
_MIN_INITIAL = 1200

RoutesCallback = Callable[[int, RoutesChanged], None]

log = structlog.get_logger("l3ptp.worker")


def _addr_text(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _normalize_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the kernel reports it, with IPv4-mapped IPv6 unmapped."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Peer:
    """One QUIC connection with its control session."""

    __slots__ = ("conn", "session", "addr", "decoder", "stream_id", "closing", "handshake_done", "established_at",
                 "rekey_packets", "rekey_at", "probe_at", "probes", "expires", "datagrams", "cids", "started_at")

    def __init__(self, conn: Any, session: Session, addr: tuple[Any, ...], expires: float = float("inf")) -> None:
        self.conn = conn
        #: A listener's candidate not ESTABLISHED by then is dropped.
        self.expires = expires
        #: Datagrams routed to this connection before its handshake completed.
        self.datagrams = 0
        #: Listener candidate: the destination CIDs its client's Initials may carry.
        self.cids: tuple[bytes, ...] = ()
        self.session = session
        self.addr = addr
        self.decoder = StreamDecoder(PEER_CONTROL)
        self.stream_id: int | None = None
        self.closing = False
        self.handshake_done = False
        self.established_at = 0.0
        #: Next key update: when DATAGRAMs sent + received reach this, or at this time.
        self.rekey_packets = 0
        self.rekey_at = 0.0
        #: Liveness probe: its deadline (None: none running) and the PINGs sent so far.
        self.probe_at: float | None = None
        self.probes = 0
        #: When the connection attempt started (connect, or the listener admitting it).
        self.started_at = 0.0


class Tunnel:
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
    ) -> None:
        self.config = config
        self.tun_fd = tun_fd
        self.sock = udp_sock
        self.engine = engine or load_engine(config.engine)
        self._budget = self.engine.datagram_budget
        self._queue_depth = self.engine.queue_depth
        self._gso = gso
        self._gro = gro
        self._key_update_packets = key_update_packets
        self._key_update_interval = key_update_interval
        #: QUIC key updates this worker started (RFC 9001, 6).
        self.key_updates = 0
        self.udp: UdpIO | None = None
        self.on_routes = on_routes
        self._rng = rng or random.SystemRandom()
        self.datapath = Datapath(local_sources=config.local_sources, peer_sources=config.peer_sources)
        self.counters = self.datapath.counters
        self._drops = self.counters.drops
        self._key = keys.private_key_from_raw(config.private_key)
        self._cert = keys.self_signed_certificate(self._key) if config.role is PeerRole.LISTEN else None
        self.params = SessionParams(
            role=config.role,
            network_id=config.network,
            endpoint_id=config.queue,
            node_id=config.node_id,
            private_key=config.private_key,
            peer_key=config.peer_key,
            requested_mtu=config.mtu,
            keepalive_interval=config.keepalive_interval,
            tunnel_addresses=tuple(config.tunnel_addresses),
            local_sources=tuple(config.local_sources),
            advertised_routes=tuple(config.advertised_routes),
        )
        self.active: _Peer | None = None
        self.candidates: dict[tuple[Any, ...], _Peer] = {}
        self.sessions = 0
        self.last_error = ""
        self.udp_ignored = 0
        self.state = SessionState.STARTING
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_tun = False
        self._stopped: asyncio.Event | None = None
        self._stop_requested = False
        #: Set when the tunnel ended itself (e.g. its TUN queue went away).
        self.exit_reason: str | None = None
        #: It ended on an exception while handling a received datagram (input
        #: from the network, not a local fault: see WorkerExiting.remote).
        self.exit_on_network_input = False
        self._backoff = RECONNECT_BACKOFF_MIN
        self._reconnect_at: float | None = None
        self._peer_addr: tuple[Any, ...] | None = None
        self._peer_ip = _normalize_ip(config.peer_address) if config.peer_address else None
        self._hint_at = 0.0
        #: Listener: where and when to send the next start hint, and how many are left.
        self._start_hint: tuple[Any, ...] | None = None
        self._start_hint_at = 0.0
        self._start_hints_left = 0
        #: Source address text -> allowed (peer_address), for the few texts seen.
        self._ip_allowed: dict[str, bool] = {}
        #: QUIC configurations by is_client, each built once (its TLS
        #: certificate and key converted once, not per connection attempt).
        self._configs: dict[bool, Any] = {}
        self.admission = Admission() if config.role is PeerRole.LISTEN else None

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
        self._loop.add_reader(self.sock.fileno(), self._guarded, self._on_udp_readable)
        try:
            if self.config.role is PeerRole.CONNECT:
                for level, opt in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                    if level == socket.IPPROTO_IP or self.sock.family == socket.AF_INET6:
                        with contextlib.suppress(OSError):
                            self.sock.setsockopt(level, opt, 1)
                self._peer_addr = await self._resolve_peer()
                self._connect()
            else:
                self.state = SessionState.CONNECTING
                self._start_hint = self._last_peer()
                if self._start_hint is not None:
                    self._start_hints_left = START_HINTS
                    self._send_start_hint(self._now())
            self._schedule()
            await self._stopped.wait()
        finally:
            self._loop.remove_reader(self.sock.fileno())
            self._stop_tun()
            if self._timer is not None:
                self._timer.cancel()

    def _last_peer(self) -> tuple[Any, ...] | None:
        """The socket address of `config.last_peer` (listener), if it passes the peer_address filter."""
        ip = _normalize_ip(self.config.last_peer) if self.config.last_peer else None
        if ip is None or not self.config.last_peer_port or (self._peer_ip is not None and ip != self._peer_ip):
            return None
        if self.sock.family == socket.AF_INET6:
            text = f"::ffff:{ip}" if ip.version == 4 else str(ip)
            return (text, self.config.last_peer_port, 0, 0)
        return (str(ip), self.config.last_peer_port) if ip.version == 4 else None

    def _send_start_hint(self, now: float) -> None:
        """Tell the connector of our predecessor's session that a new worker listens here (it probes that
        session and reconnects): without this it would learn it only from its next packet to us, a
        keepalive up to `keepalive_interval` later when the tunnel is idle in its direction."""
        if self._start_hint is None or self._start_hints_left <= 0:
            return
        self._start_hints_left -= 1
        self._start_hint_at = now + HINT_EVERY
        with contextlib.suppress(OSError):
            self.sock.sendto(RESTART_HINT, self._start_hint)
        log.debug("start_hint_sent", peer=_addr_text(self._start_hint))

    def stop(self, code: ErrorCode = ErrorCode.SHUTDOWN, reason: str = "shutdown") -> None:
        """Send CLOSE to the peer (if any), close QUIC and end `run`."""
        self.state = SessionState.STOPPED
        self._stop_requested = True
        self._reconnect_at = None
        for peer in self._all_peers():
            self._apply(peer, peer.session.close(code, reason))
        if self._stopped is not None:
            self._stopped.set()

    async def _resolve_peer(self) -> tuple[Any, ...]:
        assert self._loop is not None and self.config.peer_address is not None
        infos = await self._loop.getaddrinfo(
            self.config.peer_address, self.config.port, family=self.sock.family, type=socket.SOCK_DGRAM
        )
        return infos[0][4]

    def advertise(self, routes: tuple[str, ...], local_sources: tuple[str, ...]) -> None:
        """New advertised routes (a reload changed only those): the TUN may send
        from `local_sources` from now on, the peer hears the difference in a
        ROUTE_UPDATE with a new epoch, later sessions announce them in READY."""
        routes, local_sources = tuple(routes), tuple(local_sources)
        if routes == self.params.advertised_routes and local_sources == self.params.local_sources:
            return
        self.params = dataclasses.replace(self.params, advertised_routes=routes, local_sources=local_sources,
                                          route_epoch=self.params.route_epoch + 1)
        self.datapath.local_sources = PrefixSet(local_sources)
        for peer in self._all_peers():
            self._apply(peer, peer.session.advertise(self.params))
            self._transmit(peer)
        self._schedule()

    # ---- status ------------------------------------------------------------

    @property
    def udp_send_errors(self) -> int:
        return self.udp.send_errors if self.udp is not None else 0

    @property
    def established(self) -> bool:
        return self.active is not None and self.active.session.established

    def status(self) -> dict[str, Any]:
        peer = self.active
        rtt = 0.0
        addr = ""
        if peer is not None:
            rtt = max(0.0, self.engine.smoothed_rtt(peer.conn) * 1000.0)
            addr = f"{peer.addr[0]}:{peer.addr[1]}"
        return {
            "state": self.state,
            "peer": addr,
            "rtt_ms": rtt,
            "mtu": self.datapath.mtu,
            "queue_depth": self._queue_depth(peer.conn) if peer is not None else 0,
            "sessions": self.sessions,
            "key_updates": self.key_updates,
            "last_error": self.last_error,
        }

    # ---- connection setup --------------------------------------------------

    def _configuration(self, is_client: bool) -> Any:
        cfg = self._configs.get(is_client)
        if cfg is None:
            cfg = self._configs[is_client] = self._build_configuration(is_client)
        return cfg

    def _build_configuration(self, is_client: bool) -> Any:
        cfg = self.engine.QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            max_datagram_size=self.config.max_datagram_size,
            idle_timeout=QUIC_IDLE_TIMEOUT,  # fixed: tells a prober nothing about the keepalive
        )
        # The connector checks the listener's certificate against the pin
        # after the handshake; both engines still verify CertificateVerify.
        self.engine.configure_tls(cfg, is_client, self._key, self._cert)
        if is_client:
            cfg.server_name = _SERVER_NAME
        return cfg

    def _new_session(self, now: float) -> Session:
        return Session(
            self.params,
            self.counters,
            now=now,
            nonce=self._rng.randbytes(AUTH_NONCE_LEN),
            rx_context_id=self._rng.getrandbits(32),
        )

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _connect(self) -> None:
        assert self._peer_addr is not None
        now = self._now()
        conn = self.engine.QuicConnection(configuration=self._configuration(True))
        conn.connect(self._peer_addr, now=now)
        self.active = _Peer(conn, self._new_session(now), self._peer_addr)
        self.active.started_at = now
        self._reconnect_at = None
        self.state = SessionState.HANDSHAKING
        self._transmit(self.active)
        log.debug("quic_connect", peer=_addr_text(self._peer_addr))

    def _source_allowed(self, host: str) -> bool:
        allowed = self._ip_allowed.get(host)
        if allowed is None:
            if len(self._ip_allowed) >= 64:
                self._ip_allowed.clear()
            allowed = self._ip_allowed[host] = _normalize_ip(host) == self._peer_ip
        return allowed

    def _accept(self, data: bytes, addr: tuple[Any, ...], now: float) -> _Peer | None:
        if self._peer_ip is not None and not self._source_allowed(addr[0]):
            return None
        assert self.admission is not None
        room = len(self.candidates) < MAX_CANDIDATES or addr in self.candidates
        decision = self.admission.decide(data, addr, now, room=room)
        if isinstance(decision, DropReason):
            self.counters.drop(decision)
            return None
        if isinstance(decision, bytes):  # under load: a stateless Retry, nothing kept
            self.counters.drop(DropReason.INITIAL_RETRY)
            assert self.udp is not None
            self.udp.send([(decision, addr)])
            return None
        if not room:
            # Only an address-validated attempt (Retry token) gets here with
            # the table full: it evicts the oldest candidate (dropped without
            # a word: it has not authenticated), so that junk cannot lock a
            # legitimate peer out until the junk expires.
            del self.candidates[next(iter(self.candidates))]
        conn = self.engine.QuicConnection(
            configuration=self._configuration(False),
            original_destination_connection_id=decision.original_dcid,
            retry_source_connection_id=decision.retry_scid,
        )
        peer = _Peer(conn, self._new_session(now), addr, expires=now + CANDIDATE_LIFETIME)
        peer.cids = (decision.original_dcid, conn.host_cid) + ((decision.retry_scid,) if decision.retry_scid else ())
        peer.started_at = now
        self._start_hints_left = 0  # a connection attempt came: the connector heard us
        self.candidates[addr] = peer
        if self.active is None:
            self.state = SessionState.HANDSHAKING
        log.debug("candidate_admitted", peer=_addr_text(addr), validated=decision.retry_scid is not None)
        return peer

    def _all_peers(self) -> list[_Peer]:
        peers = list(self.candidates.values())
        if self.active is not None:
            peers.append(self.active)
        return peers

    # ---- UDP ---------------------------------------------------------------

    def _route(self, data: bytes, addr: tuple[Any, ...], now: float) -> _Peer | None:
        is_new_initial = self._looks_like_initial(data)
        active = self.active
        if active is not None and active.addr == addr and not (is_new_initial and active.handshake_done):
            return active
        cand = self.candidates.get(addr)
        if cand is not None and not (is_new_initial and cand.handshake_done):
            if not cand.handshake_done:
                # Junk sent to a candidate's address costs the engine new
                # initial keys and a failed decryption each (a millisecond):
                # only Initials to this handshake's CIDs, and only as many
                # datagrams as a handshake needs, reach it.
                cand.datagrams += 1
                if cand.datagrams > CANDIDATE_DATAGRAMS_MAX or (
                        data and (data[0] & 0xF0) == 0xC0 and (len(data) < 7 or data[6:6 + data[5]] not in cand.cids)):
                    self._drops[DropReason.INITIAL_TO_CANDIDATE] += 1
                    return None
            return cand
        admission = self.admission
        if admission is not None and is_new_initial:
            if now < admission.closed_until and not has_token(data):
                # Under a flood: the hot path, as cheap as dropping noise.
                self._drops[DropReason.INITIAL_OVER_BUDGET] += 1
                return None
            return self._accept(data, addr, now)
        return None

    @staticmethod
    def _looks_like_initial(data: bytes) -> bool:
        # Long header (0x80) with the fixed bit (0x40) and type Initial (0b00).
        return len(data) >= _MIN_INITIAL and (data[0] & 0xF0) == 0xC0

    def _on_udp_readable(self) -> None:
        now = self._now()
        touched: dict[int, _Peer] = {}
        assert self.udp is not None
        recv = self.udp.recv
        count = 0
        # Runs of consecutive datagrams for the same peer and address go to
        # the engine in one call (qh3: one trip into its core per run).
        runs: list[tuple[_Peer, Any, list[bytes]]] = []
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
        active = self.active
        if active is not None and self._packets_under_key() >= active.rekey_packets:
            self._update_keys(active, now)
        for peer in touched.values():
            self._transmit(peer)
        self._schedule()

    def _hint(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        """Listener: a short-header packet from the peer's address that no connection of ours knows (the
        peer still talks to our predecessor): tell it, at most every HINT_EVERY s (never larger than what came)."""
        if (self.config.role is PeerRole.LISTEN and data and data[0] & 0xC0 == 0x40 and len(data) >= len(RESTART_HINT)
                and now >= self._hint_at and (self._peer_ip is None or _normalize_ip(addr[0]) == self._peer_ip)):
            self._hint_at = now + HINT_EVERY
            with contextlib.suppress(OSError):
                self.sock.sendto(RESTART_HINT, addr)
            log.debug("restart_hint_sent", peer=_addr_text(addr))

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
        if peer.probe_at is not None and why != "icmp":
            return
        if peer.probe_at is None:
            peer.probes += 1
            peer.conn.send_ping(peer.probes)
            self._transmit(peer)
            log.debug("probe_started", why=why)
        peer.probe_at = now + PROBE_TIMEOUT + 3 * self.engine.smoothed_rtt(peer.conn)
        self._schedule()

    def _transmit(self, peer: _Peer) -> None:
        assert self.udp is not None
        self.udp.send(peer.conn.datagrams_to_send(now=self._now()))

    # ---- QUIC events -------------------------------------------------------

    def _process_events(self, peer: _Peer) -> None:
        ev = self.engine.events
        datapath = self.datapath
        while True:
            event = peer.conn.next_event()
            if event is None:
                return
            if isinstance(event, ev.DatagramFrameReceived):
                if peer is not self.active or not peer.session.established:
                    # Apart from the session's totals: a stranger's DATAGRAMs
                    # must not move the active session's key-update budget.
                    self.counters.unauth_rx_packets += 1
                    self.counters.unauth_rx_bytes += len(event.data)
                    self.counters.drop(DropReason.DGRAM_NOT_READY)
                    continue
                packet = datapath.from_peer(event.data)
                if packet is not None:
                    self._write_tun(packet)
            elif isinstance(event, ev.StreamDataReceived):
                self._on_stream(peer, event)
            elif isinstance(event, ev.HandshakeCompleted):
                self._on_handshake(peer)
            elif isinstance(event, ev.PingAcknowledged):
                if event.uid == peer.probes:
                    peer.probe_at = None  # alive: the ICMP error was stale or forged
            elif isinstance(event, ev.ConnectionTerminated):
                # The phrase may be the peer's (CONNECTION_CLOSE) or a stranger's.
                why = peer.session.peer_text(event.reason_phrase or "") or event.error_code
                self._on_terminated(peer, f"connection terminated: {why}")
                return

    def _on_handshake(self, peer: _Peer) -> None:
        peer.handshake_done = True
        log.debug("handshake_done", peer=_addr_text(peer.addr), ms=round((self._now() - peer.started_at) * 1000, 1))
        if self.active is peer or self.active is None:
            self.state = SessionState.AUTHENTICATING
        fp = None
        if self.config.role is PeerRole.CONNECT:
            cert = self.engine.peer_certificate(peer.conn)
            fp = keys.fingerprint_of_certificate(cert) if cert is not None else None
            peer.stream_id = peer.conn.get_next_available_stream_id()
        self._apply(peer, peer.session.handshake_completed(self._now(), fp, self._budget(peer.conn)))

    def _on_stream(self, peer: _Peer, event: Any) -> None:
        if peer.session.state is State.CLOSED:
            return
        if peer.stream_id is None and self.config.role is PeerRole.LISTEN and event.stream_id == 0:
            peer.stream_id = 0
        if event.stream_id != peer.stream_id:
            self._apply(peer, peer.session.protocol_error(f"data on unexpected stream {event.stream_id}"))
            return
        try:
            messages = peer.decoder.feed(event.data)
        except DecodeError as exc:
            self._apply(peer, peer.session.protocol_error(f"bad control message: {exc}"))
            return
        now = self._now()
        for msg in messages:
            self._apply(peer, peer.session.receive(msg, now))
            if peer.session.state is State.CLOSED:
                return
        if event.end_stream and peer.session.state is not State.CLOSED:
            self._apply(peer, peer.session.protocol_error("control stream ended"))

    def _on_terminated(self, peer: _Peer, reason: str) -> None:
        if peer.session.state is not State.CLOSED:
            peer.session.state = State.CLOSED
        self._drop_peer(peer, reason)

    # ---- session actions ---------------------------------------------------

    def _apply(self, peer: _Peer, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                if peer.stream_id is None:
                    continue  # nothing to close over yet; QUIC close below carries the code
                peer.conn.send_stream_data(peer.stream_id, frame(PEER_CONTROL, action.message))
            elif isinstance(action, Established):
                self._on_established(peer, action)
            elif isinstance(action, RoutesChanged):
                if self.on_routes is not None and peer is self.active:
                    self.on_routes(self.sessions, action)
            elif isinstance(action, Closed):
                self._close_peer(peer, action)

    def _on_established(self, peer: _Peer, est: Established) -> None:
        old = self.active
        if old is not None and old is not peer:
            self._apply(old, old.session.close(ErrorCode.SHUTDOWN, "replaced by a new session"))
        self.candidates.pop(peer.addr, None)
        self.active = peer
        self.sessions += 1
        self._backoff = RECONNECT_BACKOFF_MIN
        self.datapath.start_session(
            mtu=est.mtu,
            max_payload=self._budget(peer.conn),
            tx_context_id=est.tx_context_id,
            rx_context_id=est.rx_context_id,
            peer_addresses=est.peer_tunnel_addresses,
        )
        self.state = SessionState.ESTABLISHED
        self.last_error = ""
        self._next_key_update(peer, self._now())
        self._start_tun()
        log.info("session_established", peer=_addr_text(peer.addr), sessions=self.sessions,
                 ms=round((self._now() - peer.started_at) * 1000, 1))

    # ---- key updates -------------------------------------------------------

    def _packets_under_key(self) -> int:
        c = self.counters
        return c.dgram_tx_packets + c.dgram_rx_packets

    def _next_key_update(self, peer: _Peer, now: float) -> None:
        peer.rekey_packets = self._packets_under_key() + self._key_update_packets
        peer.rekey_at = now + self._key_update_interval

    def _update_keys(self, peer: _Peer, now: float) -> None:
        """New 1-RTT keys well before AES-GCM's confidentiality limit; neither
        engine does this on its own. Retried at the next check while the
        handshake is not yet confirmed."""
        if self.engine.update_keys(peer.conn):
            self.key_updates += 1
            self._next_key_update(peer, now)
        else:
            # Not acknowledged yet: try again soon (a deadline in the past would spin the timer).
            peer.rekey_at = now + min(1.0, self._key_update_interval)

    def _close_peer(self, peer: _Peer, closed: Closed) -> None:
        if closed.local:
            self._transmit(peer)  # flush CLOSE on the stream before CONNECTION_CLOSE
        peer.conn.close(error_code=int(closed.code), reason_phrase=closed.wire_reason[:200])
        self._transmit(peer)
        who = "local" if closed.local else "peer"
        self._drop_peer(peer, f"{who} closed: {closed.code.name}: {closed.reason}")

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        if self.candidates.get(peer.addr) is peer:
            del self.candidates[peer.addr]
        if self.active is peer:
            self.active = None
            self.datapath.stop_session()
            self._stop_tun()
            self.last_error = reason
            log.info("session_ended", peer=_addr_text(peer.addr), reason=reason[:200])
            if self.state is not SessionState.STOPPED:
                if self.config.role is PeerRole.CONNECT:
                    self._schedule_reconnect()
                else:
                    self.state = SessionState.CONNECTING
        elif self.active is None and self.state is not SessionState.STOPPED:
            self.last_error = reason

    def _schedule_reconnect(self) -> None:
        delay = self._backoff * (0.5 + self._rng.random() / 2)
        self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_MAX)
        self._reconnect_at = self._now() + delay
        self.state = SessionState.BACKOFF

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
        packets: list[bytes] = []
        read = os.read
        fd = self.tun_fd
        for _ in range(TUN_READ_BATCH):
            try:
                packet = read(fd, UDP_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._tun_lost(exc.strerror or str(exc))
                return
            if not packet:  # end of file: a TUN queue never reads empty
                self._tun_lost("end of file")
                return
            packets.append(packet)
        if not packets:
            return
        conn = peer.conn
        self.datapath.set_budget(self._budget(conn))
        payloads = self.datapath.from_tun_batch(packets, self._queue_depth(conn))
        if self.datapath.to_tun:  # ICMP "too big" for oversize packets: back into the TUN
            for error in self.datapath.to_tun:
                self._write_tun(error)
            self.datapath.to_tun.clear()
        send = conn.send_datagram_frame
        for payload in payloads:
            send(payload)
        self.datapath.sent(payloads)
        if self._packets_under_key() >= peer.rekey_packets:
            self._update_keys(peer, self._now())
        self._transmit(peer)
        self._schedule()

    def _guarded(self, callback: Callable[[], None]) -> None:
        """Run an event-loop callback; an exception nobody foresaw (a bug, an
        engine failing in a new way) ends the worker with the reason instead
        of leaving it running half-updated: asyncio would log the traceback
        and carry on, with the transmit and the timer of that round skipped.
        The controller restarts the worker with a clean state."""
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
        try:
            os.write(self.tun_fd, packet)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.counters.drop(DropReason.TUN_WRITE_EAGAIN)
            else:
                self.counters.drop(DropReason.TUN_WRITE_ERROR)
            return
        self.datapath.written(packet)

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
        for peer in self.candidates.values():
            deadlines.append(peer.expires)
        if self.active is not None and self.active.session.established:
            deadlines.append(self.active.rekey_at)
            if self.active.probe_at is not None:
                deadlines.append(self.active.probe_at)
        if self._reconnect_at is not None:
            deadlines.append(self._reconnect_at)
        if self._start_hints_left > 0:
            deadlines.append(self._start_hint_at)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self._loop.call_at(min(deadlines), self._guarded, self._on_timer)

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
            if peer.expires <= now and peer.session.state is not State.CLOSED and peer is not self.active:
                self._apply(peer, peer.session.close(ErrorCode.DEAD_PEER, "no session within the candidate lifetime"))
            if peer is self.active and peer.session.established and (
                    now >= peer.rekey_at or self._packets_under_key() >= peer.rekey_packets):
                self._update_keys(peer, now)
            if peer.probe_at is not None and now >= peer.probe_at and peer.session.state is not State.CLOSED:
                peer.probe_at = None
                log.debug("probe_failed")
                self._apply(peer, peer.session.close(ErrorCode.DEAD_PEER, "peer port unreachable, PING unanswered"))
                self._reconnect_at = now  # at once: the peer's new worker is listening by now
                self._backoff = RECONNECT_BACKOFF_MIN
            self._transmit(peer)
        if self._reconnect_at is not None and now >= self._reconnect_at and self.active is None:
            self._connect()
        if self._start_hints_left > 0 and now >= self._start_hint_at:
            self._send_start_hint(now)
        self._schedule()
