"""The peer control session: a pure state machine with a transition table.

Theory of operation
-------------------
One `Session` lives for one QUIC connection. The shell feeds it three kinds
of input and executes the actions it returns; the session never touches a
socket, a clock or a random source of its own (`now` and `nonce` are passed
in), so every path is testable without I/O.

Inputs:

* `handshake_completed(now, peer_cert_fingerprint, max_datagram_payload)`:
  the QUIC/TLS handshake finished. The connector checks the listener's
  certificate fingerprint against its pin here.
* `receive(msg, now)`: one decoded control-stream message.
* `tick(now)`: time passed; sends KEEPALIVEs and detects a dead peer.
* `protocol_error(reason)`: the shell could not decode the stream.

Outputs (a list of actions): `Send(message)`, `Established(...)`,
`RoutesChanged(...)`, `Closed(code, reason, local)`.

Message order (docs/protocol.md, "Session")::

    connector                                listener
      HELLO                        ->
                                   <-        CHALLENGE(32 random bytes)
      AUTH(public_key, signature)  ->
                                   <-        HELLO, READY
      READY                        ->
    ESTABLISHED                              ESTABLISHED

The listener proved its key during TLS (pinned certificate); the connector
proves its key with AUTH, a signature over the listener's fresh nonce, both
fingerprints, the network and the endpoint, so a proof recorded from another
session does not verify. The listener tells nothing about itself before that
proof (protocol version 2): its HELLO follows a good AUTH, and every
authentication failure, a wrong network or endpoint included, closes with
AUTH_FAILED and the one reason AUTH_FAILED_REASON on the wire. Nothing is read from or written to TUN before
ESTABLISHED. After ESTABLISHED, only ROUTE_UPDATE, KEEPALIVE, CLOSE and (listener
to a connector that listed the feature "renew") RENEW are legal. Every (role, state, message) not in `TRANSITIONS` is a protocol
violation: the session sends CLOSE(PROTOCOL_VIOLATION) and ends. CLOSE is
accepted in every state.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

from l3ptp.ipc.constants import (
    AUTH_FAILED_REASON,
    AUTH_NONCE_LEN,
    DEAD_PEER_INTERVALS,
    FEATURE_RENEW,
    HEADER_LEN,
    IP_VERSION_4,
    IP_VERSION_6,
    MAX_PREFIXES_PER_LIST,
    MTU_MIN,
    PROTOCOL_VERSION,
    REASON_MAX,
)
from l3ptp.ipc.counters import Counters
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.peer_messages import Auth, Challenge, Close, Hello, Keepalive, Ready, Renew, RouteUpdate
from l3ptp.ipc.schema import Message
from l3ptp.ipc.text import printable
from l3ptp.ipc.types import PeerRole

from . import keys
from .session_actions import Action, Closed, Established, RenewRequested, RoutesChanged, Send

__all__ = ["Closed", "Established", "RenewRequested", "RoutesChanged", "Send", "Session", "SessionParams", "State", "TRANSITIONS",
           "accepted_mtu"]


class State(enum.Enum):
    #: QUIC handshake in progress.
    HANDSHAKING = enum.auto()
    #: Waiting for the peer's HELLO (listener: first message; connector: after its AUTH).
    AWAIT_HELLO = enum.auto()
    #: Connector: HELLO sent, waiting for the listener's CHALLENGE.
    AWAIT_CHALLENGE = enum.auto()
    #: Listener: CHALLENGE sent, waiting for the connector's AUTH.
    AWAIT_AUTH = enum.auto()
    #: Waiting for the peer's READY.
    AWAIT_READY = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SessionParams:
    role: PeerRole
    network_id: str
    endpoint_id: int
    node_id: str
    private_key: bytes
    #: Pinned fingerprint of the peer's key; `pinned`, if not None, is the set accepted (several while one
    peer_key: str  # is rotated; the shell leaves out those past their not-after time: maybe none)
    requested_mtu: int
    keepalive_interval: float
    tunnel_addresses: tuple[str, ...]
    local_sources: tuple[str, ...]
    advertised_routes: tuple[str, ...]
    route_epoch: int = 1
    pinned: frozenset[str] | None = None

    def accepts(self, fingerprint: str | None) -> bool:
        return fingerprint is not None and fingerprint in (self.pinned if self.pinned is not None else {self.peer_key})


def accepted_mtu(mtu_a: int, mtu_b: int, payload_a: int, payload_b: int) -> int:
    """Accepted MTU: the smaller of both requests and both DATAGRAM budgets."""
    return min(mtu_a, mtu_b, payload_a - HEADER_LEN, payload_b - HEADER_LEN)


#: Most routes a peer may advertise at once: what one READY can carry.
MAX_PEER_ROUTES = MAX_PREFIXES_PER_LIST


class SessionClosed(Exception):
    """Internal: raised by handlers to end the session with a code."""

    def __init__(self, code: ErrorCode, reason: str, peer_reason: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.peer_reason = peer_reason
        super().__init__(reason)


def _queue_mismatch(theirs: int, ours: int) -> str:
    return f"the peer's queue {theirs} reached our queue {ours}: both ends need the same queues and underlay.ports"


def _auth_failed(detail: str) -> SessionClosed:
    """An authentication failure: `detail` stays local, the peer gets the one reason."""
    return SessionClosed(ErrorCode.AUTH_FAILED, detail, AUTH_FAILED_REASON)


#: (role, state, message type) -> (handler, next state). Anything missing is a
#: protocol violation. CLOSE is handled before the table, in every state.
TRANSITIONS: dict[tuple[PeerRole, State, type[Message]], tuple[str, State]] = {
    (PeerRole.LISTEN, State.AWAIT_HELLO, Hello): ("_on_connector_hello", State.AWAIT_AUTH),
    (PeerRole.LISTEN, State.AWAIT_AUTH, Auth): ("_on_auth", State.AWAIT_READY),
    (PeerRole.LISTEN, State.AWAIT_READY, Ready): ("_on_ready", State.ESTABLISHED),
    (PeerRole.CONNECT, State.AWAIT_CHALLENGE, Challenge): ("_on_challenge", State.AWAIT_HELLO),
    (PeerRole.CONNECT, State.AWAIT_HELLO, Hello): ("_on_listener_hello", State.AWAIT_READY),
    (PeerRole.CONNECT, State.AWAIT_READY, Ready): ("_on_ready", State.ESTABLISHED),
    (PeerRole.LISTEN, State.ESTABLISHED, RouteUpdate): ("_on_route_update", State.ESTABLISHED),
    (PeerRole.CONNECT, State.ESTABLISHED, RouteUpdate): ("_on_route_update", State.ESTABLISHED),
    (PeerRole.LISTEN, State.ESTABLISHED, Keepalive): ("_on_keepalive", State.ESTABLISHED),
    (PeerRole.CONNECT, State.ESTABLISHED, Keepalive): ("_on_keepalive", State.ESTABLISHED),
    (PeerRole.CONNECT, State.ESTABLISHED, Renew): ("_on_renew", State.ESTABLISHED),
}


class Session:
    """One control session. See the module docstring."""

    def __init__(
        self,
        params: SessionParams,
        counters: Counters,
        *,
        now: float,
        nonce: bytes,
        rx_context_id: int,
    ) -> None:
        if len(nonce) != AUTH_NONCE_LEN:
            raise ValueError("nonce must be AUTH_NONCE_LEN bytes")
        self.params = params
        self.counters = counters
        self.state = State.HANDSHAKING
        self._key = keys.private_key_from_raw(params.private_key)
        self.fingerprint = keys.fingerprint(self._key)
        self._nonce = nonce
        self.rx_context_id = rx_context_id
        self.tx_context_id: int | None = None
        self.mtu = 0
        self._max_payload = 0
        self._peer_hello: Hello | None = None
        #: The peer proved its key (connector: pinned TLS certificate; listener: AUTH), and which one.
        self.authenticated = False
        self.peer_fingerprint = ""
        self.peer_routes: set[str] = set()
        self.peer_tunnel_addresses: tuple[str, ...] = ()
        self.route_epoch = -1
        self.stale_route_updates = 0
        #: Routes our READY or ROUTE_UPDATEs told the peer (None: READY not sent yet).
        self._announced: tuple[str, ...] | None = None
        self.peer_counters: Keepalive | None = None
        self.started = now
        self.last_heard = now
        self.next_keepalive = now
        self.close_code: ErrorCode | None = None

    # ---- inputs ---------------------------------------------------------

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    def dead_after(self) -> float:
        return self.params.keepalive_interval * DEAD_PEER_INTERVALS

    def handshake_completed(
        self, now: float, peer_cert_fingerprint: str | None, max_datagram_payload: int
    ) -> list[Action]:
        """QUIC handshake done. Connector: check the pinned listener key, send HELLO."""
        if self.state is not State.HANDSHAKING:
            return self._fail(ErrorCode.PROTOCOL_VIOLATION, "handshake completed twice")
        self.last_heard = now
        self._max_payload = max_datagram_payload
        self.state = State.AWAIT_HELLO
        if self.params.role is PeerRole.CONNECT:
            if not self.params.accepts(peer_cert_fingerprint):
                return self._fail(ErrorCode.AUTH_FAILED, "listener key does not match the pinned fingerprint",
                                  AUTH_FAILED_REASON)
            self.authenticated, self.peer_fingerprint = True, str(peer_cert_fingerprint)
            self.state = State.AWAIT_CHALLENGE
            return [Send(self._hello())]
        return []

    def receive(self, msg: Message, now: float) -> list[Action]:
        """Apply one message from the peer."""
        if self.state is State.CLOSED:
            return []
        self.last_heard = now
        if isinstance(msg, Close):
            self.state = State.CLOSED
            self.close_code = _error_code(msg.code)
            return [Closed(self.close_code, self.peer_text(msg.reason), local=False)]
        entry = TRANSITIONS.get((self.params.role, self.state, type(msg)))
        if entry is None:
            return self._fail(
                ErrorCode.PROTOCOL_VIOLATION, f"{type(msg).TAG} not allowed in state {self.state.name}"
            )
        handler, next_state = entry
        try:
            actions: list[Action] = getattr(self, handler)(msg, now)
        except SessionClosed as exc:
            return self._fail(exc.code, exc.reason, exc.peer_reason)
        if handler == "_on_auth":
            self.authenticated = True
        self.state = next_state
        if next_state is State.ESTABLISHED and handler == "_on_ready":
            self.next_keepalive = now + self.params.keepalive_interval
            actions.append(
                Established(
                    mtu=self.mtu,
                    tx_context_id=self.tx_context_id or 0,
                    rx_context_id=self.rx_context_id,
                    peer_tunnel_addresses=self.peer_tunnel_addresses,
                )
            )
            actions.append(RoutesChanged(self.route_epoch, tuple(sorted(self.peer_routes)), self.peer_tunnel_addresses))
            # Our routes changed after our READY went out (connector): catch up now.
            actions.extend(self._route_update())
        return actions

    def advertise(self, params: SessionParams) -> list[Action]:
        """Our advertised routes changed (`params` has them and a higher route
        epoch). ESTABLISHED: a ROUTE_UPDATE with the difference. Earlier: the
        READY still to be sent carries them, or the step to ESTABLISHED sends
        the difference from the READY already sent."""
        self.params = params
        if self.state is not State.ESTABLISHED:
            return []
        return self._route_update()

    def _route_update(self) -> list[Action]:
        old, new = set(self._announced or ()), set(self.params.advertised_routes)
        self._announced = self.params.advertised_routes
        if old == new:
            return []
        return [Send(RouteUpdate(add_routes=tuple(sorted(new - old)), remove_routes=tuple(sorted(old - new)),
                                 route_epoch=self.params.route_epoch))]

    def peer_text(self, text: str) -> str:
        """Text the peer sent (a CLOSE reason, a QUIC reason phrase), fit to
        keep in status and logs: escaped (`printable`) once the peer has
        proven its key; before that, whoever sent it is a stranger whose
        words are not repeated to the operator."""
        if not self.authenticated:
            return "(reason withheld: peer not authenticated)" if text else ""
        return printable(text)[:REASON_MAX]

    def protocol_error(self, reason: str) -> list[Action]:
        """The control stream carried something undecodable or forbidden."""
        if self.state is State.CLOSED:
            return []
        return self._fail(ErrorCode.PROTOCOL_VIOLATION, reason)

    def terminated(self) -> None:
        """The QUIC connection under the session ended (no CLOSE can be sent or received any more)."""
        self.state = State.CLOSED

    def close(self, code: ErrorCode, reason: str) -> list[Action]:
        """Close on purpose (shutdown)."""
        if self.state is State.CLOSED:
            return []
        return self._fail(code, reason)

    def tick(self, now: float) -> list[Action]:
        """Keepalive and dead-peer detection (also bounds the handshake and auth)."""
        if self.state is State.CLOSED:
            return []
        if now - self.last_heard > self.dead_after():
            return self._fail(ErrorCode.DEAD_PEER, "peer silent for too long")
        if self.state is State.ESTABLISHED and now >= self.next_keepalive:
            self.next_keepalive = now + self.params.keepalive_interval
            c = self.counters
            return [
                Send(
                    Keepalive(
                        monotonic_time=max(0.0, now),
                        rx_packets=c.dgram_rx_packets,
                        tx_packets=c.dgram_tx_packets,
                        drop_counters={k: v for k, v in c.drops_snapshot().items() if v},
                    )
                )
            ]
        return []

    def next_deadline(self) -> float:
        """When `tick` next has something to do."""
        deadline = self.last_heard + self.dead_after()
        if self.state is State.ESTABLISHED:
            deadline = min(deadline, self.next_keepalive)
        return deadline

    # ---- handlers (called through TRANSITIONS) ---------------------------

    @staticmethod
    def _check_version(msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            raise SessionClosed(ErrorCode.VERSION_MISMATCH, f"protocol version {msg.protocol_version}")
        if msg.auth_nonce:
            raise SessionClosed(ErrorCode.PROTOCOL_VIOLATION, "HELLO must not carry a nonce")

    def _check_hello(self, msg: Hello) -> None:
        self._check_version(msg)
        if msg.network_id != self.params.network_id:
            raise SessionClosed(ErrorCode.NETWORK_MISMATCH, "network does not match (both ends name it the same)")
        if msg.endpoint_id != self.params.endpoint_id:
            raise SessionClosed(ErrorCode.NETWORK_MISMATCH, _queue_mismatch(msg.endpoint_id, self.params.endpoint_id))
        mtu = accepted_mtu(self.params.requested_mtu, msg.requested_mtu, self._max_payload, msg.max_datagram_payload)
        if mtu < MTU_MIN:
            raise SessionClosed(ErrorCode.MTU_MISMATCH, f"accepted MTU {mtu} below {MTU_MIN}")
        self.mtu = mtu
        self._peer_hello = msg

    def _on_connector_hello(self, msg: Hello, now: float) -> list[Action]:
        # Only the version is checked now (it is no secret); the rest waits
        # for AUTH, so that a stranger learns nothing from which check fails.
        self._check_version(msg)
        self._peer_hello = msg
        return [Send(Challenge(auth_nonce=self._nonce))]

    def _on_challenge(self, msg: Challenge, now: float) -> list[Action]:
        transcript = keys.auth_transcript(
            msg.auth_nonce, self.peer_fingerprint, self.fingerprint, self.params.network_id, self.params.endpoint_id
        )
        return [Send(Auth(public_key=keys.public_key_raw(self._key), signature=keys.sign_auth(self._key, transcript)))]

    def _on_listener_hello(self, msg: Hello, now: float) -> list[Action]:
        self._check_hello(msg)
        return [Send(self._ready())]

    def _on_auth(self, msg: Auth, now: float) -> list[Action]:
        peer_fingerprint = keys.fingerprint(msg.public_key)
        if not self.params.accepts(peer_fingerprint):
            raise _auth_failed("connector key does not match the pinned fingerprint")
        transcript = keys.auth_transcript(
            self._nonce, self.fingerprint, peer_fingerprint, self.params.network_id, self.params.endpoint_id
        )
        if not keys.verify_auth(msg.public_key, msg.signature, transcript):
            # Also a connector of another network or endpoint: it signed its own. Its key is pinned, so the
            # local log may say which (the wire still says only AUTH_FAILED).
            hello = self._peer_hello
            if hello is not None and hello.network_id == self.params.network_id \
                    and hello.endpoint_id != self.params.endpoint_id:
                raise _auth_failed(_queue_mismatch(hello.endpoint_id, self.params.endpoint_id))
            raise _auth_failed("bad AUTH signature (or another network or endpoint)")
        self.peer_fingerprint = peer_fingerprint
        assert self._peer_hello is not None  # AWAIT_AUTH follows the connector's HELLO
        try:
            self._check_hello(self._peer_hello)
        except SessionClosed as exc:
            if exc.code is ErrorCode.NETWORK_MISMATCH:  # unreachable with a valid signature; still uniform
                raise _auth_failed(exc.reason) from None
            raise
        return [Send(self._hello()), Send(self._ready())]

    def _on_ready(self, msg: Ready, now: float) -> list[Action]:
        if msg.accepted_mtu != self.mtu:
            raise SessionClosed(ErrorCode.MTU_MISMATCH, f"peer accepted MTU {msg.accepted_mtu}, we {self.mtu}")
        self.tx_context_id = msg.datagram_context_id
        self.peer_tunnel_addresses = tuple(msg.peer_tunnel_addresses)
        self.peer_routes = set(msg.peer_advertised_routes)
        self.route_epoch = msg.route_epoch
        return []

    def _on_route_update(self, msg: RouteUpdate, now: float) -> list[Action]:
        if msg.route_epoch <= self.route_epoch:
            self.stale_route_updates += 1
            return []
        routes = self.peer_routes.difference(msg.remove_routes)
        routes.update(msg.add_routes)
        if len(routes) > MAX_PEER_ROUTES:
            # Each ROUTE_UPDATE is legal on its own; their sum must still fit
            # one READY (and the PeerRoutes report to the controller).
            self.counters.peer_route_limit += 1
            raise SessionClosed(ErrorCode.LIMIT, f"peer advertises {len(routes)} routes, more than {MAX_PEER_ROUTES}")
        self.route_epoch = msg.route_epoch
        self.peer_routes = routes
        return [RoutesChanged(self.route_epoch, tuple(sorted(self.peer_routes)), self.peer_tunnel_addresses)]

    def _on_keepalive(self, msg: Keepalive, now: float) -> list[Action]:
        self.peer_counters = msg
        return []

    def _on_renew(self, msg: Renew, now: float) -> list[Action]:
        return [RenewRequested(self.peer_text(msg.reason))]

    def request_renewal(self, reason: str) -> list[Action]:
        """Listener, ESTABLISHED: ask the connector to move the session to a new connection (RENEW), if its
        HELLO said it can; [] otherwise (the caller's deadline, if any, still holds)."""
        hello = self._peer_hello
        if self.state is not State.ESTABLISHED or self.params.role is not PeerRole.LISTEN or hello is None \
                or FEATURE_RENEW not in hello.supported_features:
            return []
        return [Send(Renew(reason=reason[:REASON_MAX]))]

    # ---- helpers ---------------------------------------------------------

    def _hello(self) -> Hello:
        families = sorted(
            {IP_VERSION_4 if ipaddress.ip_network(p, strict=False).version == 4 else IP_VERSION_6
             for p in self.params.local_sources + self.params.tunnel_addresses}
            or {IP_VERSION_4, IP_VERSION_6}
        )
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            network_id=self.params.network_id,
            endpoint_id=self.params.endpoint_id,
            node_id=self.params.node_id,
            supported_features=(FEATURE_RENEW,),
            max_datagram_payload=self._max_payload,
            requested_mtu=self.params.requested_mtu,
            supported_address_families=tuple(families),
            auth_nonce=b"",
        )

    def _ready(self) -> Ready:
        self._announced = self.params.advertised_routes
        return Ready(
            accepted_mtu=self.mtu,
            peer_tunnel_addresses=self.params.tunnel_addresses,
            peer_allowed_sources=self.params.local_sources,
            peer_advertised_routes=self.params.advertised_routes,
            datagram_context_id=self.rx_context_id,
            route_epoch=self.params.route_epoch,
        )

    def _fail(self, code: ErrorCode, reason: str, peer_reason: str | None = None) -> list[Action]:
        # Our reasons may quote what the peer sent (a decode error's value).
        reason = printable(reason)[:REASON_MAX]
        self.state = State.CLOSED
        self.close_code = code
        closed = Closed(code, reason, local=True, peer_reason=peer_reason)
        return [Send(Close(code=int(code), reason=closed.wire_reason)), closed]


def _error_code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL
