"""L3PTP control-stream messages between peer workers (seed "Control Plane").

Carried on one client-initiated bidirectional QUIC stream (stream 0), framed
by `codec.frame` / `codec.StreamDecoder` (4-byte length + msgpack). Field
names follow the seed roadmap. The exchange and state machine are in
docs/protocol.md; `AUTH` is l3ptp's addition for pinned-key authentication
of the connecting side.
"""

from __future__ import annotations

from typing import Annotated

from .constants import AUTH_NONCE_LEN, CONTROL_FRAME_MAX, MAX_QUEUES, MTU_MAX, MTU_MIN
from .codec import Channel
from .schema import U8, U16, U32, U64, Blob, Items, Message, Range, message
from .types import Counts, Features, Interfaces, NetworkName, NodeId, Prefixes, Reason

Mtu = Annotated[int, Range(MTU_MIN, MTU_MAX)]


@message("hello")
class Hello(Message):
    protocol_version: U16
    #: The network's name; both ends must agree.
    network_id: NetworkName
    #: Queue index: the endpoint within the network (seed: endpoint_id).
    endpoint_id: Annotated[int, Range(0, MAX_QUEUES - 1)]
    node_id: NodeId
    supported_features: Features
    #: Largest DATAGRAM payload this side can send on this connection.
    max_datagram_payload: U16
    requested_mtu: Mtu
    supported_address_families: Annotated[tuple[U8, ...], Items(2)]
    #: Always empty since protocol version 2 (the challenge is `Challenge`);
    #: kept so that a version-1 HELLO still decodes and is refused with
    #: VERSION_MISMATCH rather than as an undecodable message.
    auth_nonce: Annotated[bytes, Blob(AUTH_NONCE_LEN, 0)]


@message("challenge")
class Challenge(Message):
    """Listener's first message: the fresh nonce the connector must sign.
    Nothing else about the listener is told before the connector's AUTH."""

    auth_nonce: Annotated[bytes, Blob(AUTH_NONCE_LEN, AUTH_NONCE_LEN)]


@message("auth")
class Auth(Message):
    """Connector's proof of its pinned key, bound to this session's challenge."""

    public_key: Annotated[bytes, Blob(32, 32)]
    signature: Annotated[bytes, Blob(64, 64)]


@message("ready")
class Ready(Message):
    accepted_mtu: Mtu
    #: The sender's own tunnel addresses (the receiver's peer addresses).
    peer_tunnel_addresses: Interfaces
    #: Source prefixes the sender will use (informative; receivers enforce their own config).
    peer_allowed_sources: Prefixes
    peer_advertised_routes: Prefixes
    #: Context id the sender expects on DATAGRAMs it receives.
    datagram_context_id: U32
    route_epoch: U64


@message("route_update")
class RouteUpdate(Message):
    add_routes: Prefixes
    remove_routes: Prefixes
    route_epoch: U64


@message("keepalive")
class Keepalive(Message):
    monotonic_time: Annotated[float, Range(0.0, 1e12)]
    rx_packets: U64
    tx_packets: U64
    drop_counters: Counts


@message("renew")
class Renew(Message):
    """Listener -> connector, ESTABLISHED only, and only to a connector whose HELLO listed the feature
    FEATURE_RENEW: open a new connection and move the session to it (docs/protocol.md, "Renewal"). The
    listener cannot start a connection itself; it asks when its own key changed or the connector's key is
    no longer pinned."""

    reason: Reason


@message("close")
class Close(Message):
    code: U16
    reason: Reason


PEER_CONTROL = Channel("peer-control", CONTROL_FRAME_MAX, (Hello, Challenge, Auth, Ready, RouteUpdate, Keepalive, Renew, Close))
