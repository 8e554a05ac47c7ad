"""Connection bookkeeping of the tunnel: its QUIC connections, which datagram goes to which, new ones.

`Peer` is one QUIC connection with its control session and its `PeerPolicy` (worker/core.py).
`Connections` is the part of `Tunnel` (worker/tunnel.py, which derives from it) that keeps the
active connection and the listener's candidates, starts one (`_connect`), routes a received
datagram to one of them (`_route`), admits a connection attempt (`_accept`, asking
`admission.Admission` and the core), handles each connection's QUIC events and carries out its
session's actions (`_apply`), and builds the QUIC configurations (once per worker).

Listener: a QUIC Initial from a new address (or a new Initial from the current peer's address,
i.e. a peer restarted on the same port) is a connection attempt; `admission.Admission` decides
whether it starts a candidate connection, gets a stateless Retry (under load) or is dropped, within
budgets. A candidate that becomes ESTABLISHED replaces the active session. At most MAX_CANDIDATES
candidates exist at once, each for at most CANDIDATE_LIFETIME seconds (`core.TunnelCore`).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from l3ptp.ipc.codec import StreamDecoder, frame
from l3ptp.ipc.constants import ALPN, AUTH_NONCE_LEN, MAX_DATAGRAM_FRAME_SIZE, QUIC_IDLE_TIMEOUT
from l3ptp.ipc.control_messages import SessionState, WorkerConfig
from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.errors import DecodeError, ErrorCode
from l3ptp.ipc.peer_messages import PEER_CONTROL
from l3ptp.ipc.types import PeerRole

from . import keys, reality_link
from .admission import has_token
from .core import PeerPolicy
from .ippacket import PrefixSet
from .policy import looks_like_initial, normalize_ip
from .session import Closed, Established, RenewRequested, RoutesChanged, Send, Session, SessionParams, State

if TYPE_CHECKING:
    from .tunnel import Tunnel

__all__ = ["Connections", "Peer", "addr_text", "session_params"]

_SERVER_NAME = "l3ptp"
#: CIDs of a connection the listener recognises a moved peer by (the handshake's, then those the engine
#: issues as NEW_CONNECTION_ID, less the retired: a handful; the bound only stops a runaway).
MAX_KNOWN_CIDS = 32
#: Seconds after a peer moved during which its packets still arriving from the old address (reordered,
#: in flight) swing the engine back and forth without counting as migrations.
MIGRATION_SETTLE = 1.0

log = structlog.get_logger("l3ptp.worker")


def addr_text(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}"


def pinned_now(config: WorkerConfig, wall: float) -> frozenset[str]:
    """The peer keys a handshake accepts at unix time `wall`: those not past their not-after time (maybe
    none: then nobody gets in); without `peer_keys`, `peer_key` alone."""
    if not config.peer_keys:
        return frozenset((config.peer_key,))
    times = config.peer_keys_not_after or (0.0,) * len(config.peer_keys)
    return frozenset(k for k, t in zip(config.peer_keys, times, strict=True) if t == 0.0 or wall < t)


def session_params(config: WorkerConfig) -> SessionParams:
    """The control session's parameters for a worker's configuration."""
    return SessionParams(
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


class Peer:
    """One QUIC connection with its control session."""

    __slots__ = ("conn", "session", "addr", "decoder", "stream_id", "handshake_done", "policy", "cids", "left")

    def __init__(self, conn: Any, session: Session, addr: tuple[Any, ...], policy: PeerPolicy) -> None:
        self.conn = conn
        self.session = session
        self.addr = addr
        self.policy = policy
        #: Listener candidate: the destination CIDs its client's Initials may carry.
        self.cids: tuple[bytes, ...] = ()
        self.decoder = StreamDecoder(PEER_CONTROL)
        self.stream_id: int | None = None
        self.handshake_done = False
        #: Addresses the peer moved away from, and when (a few): a late packet from one of them swings the
        #: engine back for a moment; that is no new migration.
        self.left: dict[tuple[Any, ...], float] = {}


class Connections:
    """Connection bookkeeping; a base of `Tunnel`, whose attributes it uses."""

    def advertise(self: Tunnel, routes: tuple[str, ...], local_sources: tuple[str, ...]) -> None:
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

    def _configuration(self: Tunnel, is_client: bool) -> Any:
        cfg = self._configs.get(is_client)
        if cfg is None:
            cfg = self._configs[is_client] = self._build_configuration(is_client)
        return cfg

    def _build_configuration(self: Tunnel, is_client: bool) -> Any:
        alpn, server_name = reality_link.quic_settings(self.config, ALPN, _SERVER_NAME)
        cfg = self.engine.QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[alpn],
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            max_datagram_size=self.config.max_datagram_size,
            idle_timeout=QUIC_IDLE_TIMEOUT,  # fixed: tells a prober nothing about the keepalive
        )
        # The connector checks the listener's certificate against the pin
        # after the handshake; both engines still verify CertificateVerify.
        self.engine.configure_tls(cfg, is_client, self._key, self._cert)
        if is_client:
            cfg.server_name = server_name
        return cfg

    def _new_session(self: Tunnel, now: float) -> Session:
        return Session(
            dataclasses.replace(self.params, pinned=pinned_now(self.config, time.time())),
            self.counters,
            now=now,
            nonce=self._rng.randbytes(AUTH_NONCE_LEN),
            rx_context_id=self._rng.getrandbits(32),
        )

    def _last_peer(self: Tunnel) -> tuple[Any, ...] | None:
        """The socket address of `config.last_peer` (listener), if it passes the peer_address filter."""
        ip = normalize_ip(self.config.last_peer) if self.config.last_peer else None
        if ip is None or not self.config.last_peer_port or (self._peer_ip is not None and ip != self._peer_ip):
            return None
        if self.sock.family == socket.AF_INET6:
            text = f"::ffff:{ip}" if ip.version == 4 else str(ip)
            return (text, self.config.last_peer_port, 0, 0)
        return (str(ip), self.config.last_peer_port) if ip.version == 4 else None

    async def _resolve_peer(self: Tunnel) -> tuple[Any, ...]:
        """The peer's socket address for our socket's family: its address, or its name resolved now."""
        assert self._loop is not None and self.config.peer_address is not None
        infos = await self._loop.getaddrinfo(self.config.peer_address, self.config.port, type=socket.SOCK_DGRAM)
        for family, _type, _proto, _name, sockaddr in infos:
            if self.sock.family == socket.AF_INET6:  # dual-stack: an IPv4 address as ::ffff:a.b.c.d
                return sockaddr if family == socket.AF_INET6 else (f"::ffff:{sockaddr[0]}", sockaddr[1], 0, 0)
            if family == socket.AF_INET:
                return sockaddr
        raise OSError(f"no {'IPv4 ' if self.sock.family == socket.AF_INET else ''}address")

    async def _resolve_and_connect(self: Tunnel) -> None:
        """Connector: resolve the peer (a name resolves again at every reconnect) and connect; when it does
        not resolve, count it, say so in `last_error` and try again after the backoff."""
        try:
            addr = await self._resolve_peer()
        except OSError as exc:  # socket.gaierror too
            self.peer_resolve_failures += 1
            self.last_error = f"cannot resolve peer {self.config.peer_address!r}: {exc}"[:500]
            log.warning("peer_unresolved", peer=self.config.peer_address, error=str(exc)[:200])
            if not self._stop_requested:
                self._schedule_reconnect()
                self._schedule()
            return
        if addr != self._peer_addr and self._peer_addr is not None:
            log.info("peer_resolved", peer=self.config.peer_address, old=addr_text(self._peer_addr), new=addr_text(addr))
        self._peer_addr = addr
        if not self._stop_requested and self.active is None:
            self._connect()
            self._schedule()

    def _reconnect(self: Tunnel) -> None:
        """Connector: the backoff is over. A peer given by name is resolved again first (off the loop's hot
        path; the timer does not fire again meanwhile)."""
        if self._peer_is_name:
            assert self._loop is not None
            self.core.resolving()
            self._resolving = self._loop.create_task(self._resolve_and_connect())
        else:
            self._connect()

    def _source_allowed(self: Tunnel, host: str) -> bool:
        allowed = self._ip_allowed.get(host)
        if allowed is None:
            if len(self._ip_allowed) >= 64:
                self._ip_allowed.clear()
            allowed = self._ip_allowed[host] = normalize_ip(host) == self._peer_ip
        return allowed

    def _accept(self: Tunnel, data: bytes, addr: tuple[Any, ...], now: float) -> Peer | None:
        if self._peer_ip is not None and not self._source_allowed(addr[0]):
            return None
        assert self.admission is not None
        room = self.core.room(len(self.candidates), addr in self.candidates)
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
            del self.candidates[self.core.evict(self.candidates)]
        conn = self.engine.QuicConnection(
            configuration=self._configuration(False),
            original_destination_connection_id=decision.original_dcid,
            retry_source_connection_id=decision.retry_scid,
        )
        peer = Peer(conn, self._new_session(now), addr, self.core.admitted(now))
        peer.cids = (decision.original_dcid, conn.host_cid) + ((decision.retry_scid,) if decision.retry_scid else ())
        self.candidates[addr] = peer
        self.multi = self.multi or (self.active is not None and self.active.addr == addr)
        if self.active is None:
            self.state = SessionState.HANDSHAKING
        log.debug("candidate_admitted", peer=addr_text(addr), validated=decision.retry_scid is not None)
        return peer

    def _all_peers(self: Tunnel) -> list[Peer]:
        peers = [*self.candidates.values(), *self._renewal_peers()]
        if self.active is not None:
            peers.append(self.active)
        return peers

    def _route(self: Tunnel, data: bytes, addr: tuple[Any, ...], now: float) -> Peer | None:
        if self.multi:  # a renewal: connections share the peer's address (worker/renewal.py)
            by_cid = self._by_cid(data)
            if by_cid is not None:
                return by_cid
        is_new_initial = looks_like_initial(data)
        active = self.active
        if active is not None and active.addr == addr and not (is_new_initial and active.handshake_done) \
                and not (self.multi and addr in self.candidates):  # a renewal's candidate: its own checks below
            return active
        cand = self.candidates.get(addr)
        if cand is not None and not (is_new_initial and cand.handshake_done):
            if not cand.handshake_done and not self.core.candidate_datagram(cand.policy, data, cand.cids):
                self._drops[DropReason.INITIAL_TO_CANDIDATE] += 1
                return None
            return cand
        moved = self._moved_peer(data, addr)
        if moved is not None:
            return moved
        if self.reality is not None:  # REALITY: the gate decides before anything answers
            return self._gated(data, addr, now)
        admission = self.admission
        if admission is not None and is_new_initial:
            if now < admission.closed_until and not has_token(data):
                # Under a flood: the hot path, as cheap as dropping noise.
                self._drops[DropReason.INITIAL_OVER_BUDGET] += 1
                return None
            return self._accept(data, addr, now)
        return None

    def _moved_peer(self: Tunnel, data: bytes, addr: tuple[Any, ...]) -> Peer | None:
        """Listener: a short-header packet from an address we do not know, addressed to one of the active
        connection's CIDs: the peer moved (a NAT rebinding, a new address; RFC 9000, 9). It goes to that
        connection, whose engine validates the new path (anti-amplification until then) and sends there;
        `_transmit` follows. Anything else from that address is not the peer's."""
        active = self.active
        if active is None or not active.handshake_done or not data or data[0] & 0xC0 != 0x40:
            return None
        if bytes(data[1:1 + len(active.conn.host_cid)]) not in active.cids:
            return None
        if self._peer_ip is not None and not self._source_allowed(addr[0]):
            return None
        return active

    def _transmit(self: Tunnel, peer: Peer) -> None:
        assert self.udp is not None
        datagrams = peer.conn.datagrams_to_send(now=self._now())
        if datagrams and peer is self.active and datagrams[-1][1] != peer.addr:
            # The engine sends elsewhere: the peer's path changed (our side of RFC 9000, 9).
            now, old, peer.addr = self._now(), peer.addr, datagrams[-1][1]
            back = now - peer.left.pop(peer.addr, -MIGRATION_SETTLE) < MIGRATION_SETTLE
            peer.left[old] = now
            while len(peer.left) > 4:
                del peer.left[next(iter(peer.left))]
            if not back:  # a straggler from the address it just left does not count
                self.path_migrations += 1
                log.info("peer_migrated", old=addr_text(old), new=addr_text(peer.addr))
        self.udp.send(datagrams)

    def _gated(self: Tunnel, data: bytes, addr: tuple[Any, ...], now: float) -> Peer | None:
        """REALITY listener: a sender with no connection. Only a sealed first flight reaches admission; the
        gate buffered its earlier datagrams (they go to the engine here), `data` is the last (the caller's)."""
        assert self.reality is not None
        passed = self.reality.datagram(addr, data, now)
        if not passed:
            return None
        assert passed[-1] is data
        peer = self._accept(passed[0], addr, now)
        if peer is not None and len(passed) > 1:
            self.engine.receive_many(peer.conn, list(passed[:-1]), addr, now)
        return peer

    def _client_peer(self: Tunnel, now: float, policy: PeerPolicy) -> Peer:
        """Connector: a new connection to the peer (the active one, or a renewal's successor), not yet sent."""
        assert self._peer_addr is not None
        conn = self.engine.QuicConnection(configuration=self._configuration(True))
        reality_link.connect(conn, self._peer_addr, now, self.config)
        peer = Peer(conn, self._new_session(now), self._peer_addr, policy)
        peer.cids = (conn.host_cid,)
        return peer

    def _connect(self: Tunnel) -> None:
        now = self._now()
        self.active = self._client_peer(now, self.core.connecting(now))
        self.state = SessionState.HANDSHAKING
        self._transmit(self.active)
        log.debug("quic_connect", peer=addr_text(self._peer_addr))

    # ---- QUIC events -------------------------------------------------------

    def _process_events(self: Tunnel, peer: Peer) -> None:
        ev = self.engine.events
        datapath = self.datapath
        while True:
            event = peer.conn.next_event()
            if event is None:
                return
            if isinstance(event, ev.DatagramFrameReceived):
                if (peer is not self.active and peer not in self.retiring) or not peer.session.established:
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
                self.core.ping_acked(peer.policy, event.uid)
            elif isinstance(event, ev.ConnectionIdIssued):  # the peer may address us by it from a new path
                if len(peer.cids) < MAX_KNOWN_CIDS:
                    peer.cids = (*peer.cids, event.connection_id)
            elif isinstance(event, ev.ConnectionIdRetired):
                peer.cids = tuple(c for c in peer.cids if c != event.connection_id)
            elif isinstance(event, ev.ConnectionTerminated):
                # The phrase may be the peer's (CONNECTION_CLOSE) or a stranger's.
                why = peer.session.peer_text(event.reason_phrase or "") or event.error_code
                self._on_terminated(peer, f"connection terminated: {why}")
                return

    def _on_handshake(self: Tunnel, peer: Peer) -> None:
        peer.handshake_done = True
        log.debug("handshake_done", peer=addr_text(peer.addr),
                  ms=round((self._now() - peer.policy.started_at) * 1000, 1))
        if self.active is peer or self.active is None:
            self.state = SessionState.AUTHENTICATING
        fp = None
        if self.config.role is PeerRole.CONNECT:
            cert = self.engine.peer_certificate(peer.conn)
            fp = keys.fingerprint_of_certificate(cert) if cert is not None else None
            peer.stream_id = peer.conn.get_next_available_stream_id()
        self._apply(peer, peer.session.handshake_completed(self._now(), fp, self._budget(peer.conn)))

    def _on_stream(self: Tunnel, peer: Peer, event: Any) -> None:
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

    def _on_terminated(self: Tunnel, peer: Peer, reason: str) -> None:
        peer.session.terminated()
        self._drop_peer(peer, reason)

    # ---- session actions ---------------------------------------------------

    def _apply(self: Tunnel, peer: Peer, actions: list[Any]) -> None:
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
            elif isinstance(action, RenewRequested) and peer is self.active:
                self.renew(self._now(), f"the peer asked: {action.reason}")

    def _on_established(self: Tunnel, peer: Peer, est: Established) -> None:
        old = self.active
        renewed = old is not None and old is not peer and self._switching(old, peer)
        if old is not None and old is not peer and not renewed:
            self._apply(old, old.session.close(ErrorCode.SHUTDOWN, "replaced by a new session"))
        self.candidates.pop(peer.addr, None)
        self.active = peer
        self.sessions += 1
        self.datapath.start_session(
            mtu=est.mtu,
            max_payload=self._budget(peer.conn),
            tx_context_id=est.tx_context_id,
            rx_context_id=est.rx_context_id,
            peer_addresses=est.peer_tunnel_addresses,
            keep_previous=renewed,
        )
        self.state = SessionState.ESTABLISHED
        self.last_error = ""
        self.core.established(peer.policy, self._now(), self._packets_under_key())
        self._start_tun()
        log.info("session_established", peer=addr_text(peer.addr), sessions=self.sessions,
                 ms=round((self._now() - peer.policy.started_at) * 1000, 1))

    # ---- session ends ------------------------------------------------------

    def _close_peer(self: Tunnel, peer: Peer, closed: Closed) -> None:
        if closed.local:
            self._transmit(peer)  # flush CLOSE on the stream before CONNECTION_CLOSE
        peer.conn.close(error_code=int(closed.code), reason_phrase=closed.wire_reason[:200])
        self._transmit(peer)
        who = "local" if closed.local else "peer"
        self._drop_peer(peer, f"{who} closed: {closed.code.name}: {closed.reason}")

    def _drop_peer(self: Tunnel, peer: Peer, reason: str) -> None:
        # What it still had queued never leaves (qh3 empties its queue itself when it fails: `lost`).
        lost = self._queue_depth(peer.conn) + getattr(peer.conn, "datagrams_lost", 0)
        if lost:
            self.counters.drop(DropReason.DGRAM_LOST_ON_CLOSE, lost)
        if self.candidates.get(peer.addr) is peer:
            del self.candidates[peer.addr]
        self._forget(peer, reason)
        if self.active is peer:
            self.active = None
            self.datapath.stop_session()
            self._stop_tun()
            self.last_error = reason
            log.info("session_ended", peer=addr_text(peer.addr), reason=reason[:200])
            if self.state is not SessionState.STOPPED:
                if self.config.role is PeerRole.CONNECT and self.successor is not None:
                    self.active, self.successor = self.successor, None  # the renewal's connection is the next
                    self.active.policy.expires, self.state = float("inf"), SessionState.HANDSHAKING
                elif self.config.role is PeerRole.CONNECT:
                    self._schedule_reconnect()
                else:
                    self.state = SessionState.CONNECTING
        elif self.active is None and self.state is not SessionState.STOPPED:
            self.last_error = reason

    def _schedule_reconnect(self: Tunnel) -> None:
        self.core.session_ended(self._now())
        self.state = SessionState.BACKOFF
