"""Messages between controller, workers and the operator CLI.

Channels
--------
* `WORKER_CONFIG`: the controller writes one `WorkerConfig` to a new worker's
  stdin (an inherited pipe, so no other process can claim a worker's ticket
  or key) and closes it.
* `BUS_UP` (worker -> controller) and `BUS_DOWN` (controller -> worker): ZeroMQ
  DEALER (worker) / ROUTER (controller) over an ipc:// endpoint in the
  controller's runtime directory.
* `CLI_REQUESTS` / `CLI_REPLIES`: the `l3ptp` command and the controller, over
  a ZeroMQ ipc:// socket whose file permissions decide who may connect.
"""

from __future__ import annotations

import enum
from typing import Annotated

from .constants import (
    BUS_MESSAGE_MAX,
    CLI_MESSAGE_MAX,
    HOSTNAME_MAX,
    HOSTNAME_PATTERN,
    MAX_DATAGRAM_SIZE_MAX,
    MAX_DATAGRAM_SIZE_MIN,
    MAX_QUEUES,
    MTU_MAX,
    MTU_MIN,
    PEER_KEYS_MAX,
    REALITY_SHORT_ID_MAX,
    REALITY_SHORT_IDS_MAX,
    WORKER_CONFIG_MAX,
)
from .codec import Channel
from .errors import ErrorCode
from .schema import U16, U32, U64, AddressStr, Blob, Items, Message, Range, Record, Text, message, record
from .types import (
    Counts,
    Fingerprint,
    IfName,
    Interfaces,
    NetworkName,
    NodeId,
    Path,
    PeerRole,
    Prefixes,
    Reason,
    Ticket,
)

QueueIndex = Annotated[int, Range(0, MAX_QUEUES - 1)]
Seconds = Annotated[float, Range(0.0, 86400.0 * 366)]
Rtt = Annotated[float, Range(0.0, 3600_000.0)]
Endpoint = Annotated[str, Text(4096, r"ipc://[^\x00]+")]
Name = Annotated[str, Text(64, r"[a-z_][a-z0-9_-]{0,63}\$?|")]
#: A camouflage host or a TLS server name; "" = none.
Hostname = Annotated[str, Text(HOSTNAME_MAX, HOSTNAME_PATTERN + "|")]
ShortId = Annotated[bytes, Blob(REALITY_SHORT_ID_MAX)]


class SessionState(enum.StrEnum):
    """What a worker reports about its peer session."""

    STARTING = "starting"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    AUTHENTICATING = "authenticating"
    ESTABLISHED = "established"
    CLOSING = "closing"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class Engine(enum.StrEnum):
    """QUIC engine a worker uses: aioquic (default) or qh3 (optional extra)."""

    AUTO = "auto"
    AIOQUIC = "aioquic"
    QH3 = "qh3"


class EventLoop(enum.StrEnum):
    """Event loop a worker runs: asyncio (auto) or uvloop."""

    AUTO = "auto"
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


class UnderlayPorts(enum.StrEnum):
    """How a network's queues use UDP ports: all on one port (steered by connection ID), or port + queue."""

    SHARED = "shared"
    PER_QUEUE = "per-queue"


class NetworkState(enum.StrEnum):
    """What the controller reports about a network."""

    STARTING = "starting"
    UP = "up"  # every queue's session is established
    DEGRADED = "degraded"  # some queues established, or workers restarting
    CONNECTING = "connecting"  # no queue established yet
    FAILED = "failed"  # gave up after repeated crashes; see last_error
    STOPPING = "stopping"
    DOWN = "down"  # configured but administratively down


# ---- controller -> worker (stdin) -----------------------------------------


@message("worker.config")
class WorkerConfig(Message):
    """Everything a worker needs; the worker reads no configuration file."""

    network: NetworkName
    queue: QueueIndex
    queues: Annotated[int, Range(1, MAX_QUEUES)]
    ticket: Ticket
    helper_socket: Path
    bus_endpoint: Endpoint
    role: PeerRole
    node_id: NodeId
    #: listen: bind address; connect: optional source address.
    local_address: AddressStr | None
    #: connect: the peer's underlay address or DNS name (resolved by the worker); listen: optional filter (an address).
    peer_address: Hostname | None
    #: UDP port of this queue: the network's one port (`ports` shared), or base port + queue index (per-queue).
    port: Annotated[int, Range(1, 65535)]
    #: shared: every queue on `port` (listen: SO_REUSEPORT, steered by the helper); the connection IDs of
    #: queue k satisfy cid[0] % queues == k in both modes (worker/steering.py).
    ports: UnderlayPorts = UnderlayPorts.SHARED
    #: On a TUN with IFF_VNET_HDR: ask the kernel for TSO super-packets (`offload = "auto"`); False: only
    #: coalesce what is written (`"gro"`; docs/worker.md, "TUN offloads").
    tso: bool = True
    mtu: Annotated[int, Range(MTU_MIN, MTU_MAX)]
    max_datagram_size: Annotated[int, Range(MAX_DATAGRAM_SIZE_MIN, MAX_DATAGRAM_SIZE_MAX)]
    keepalive_interval: Annotated[float, Range(0.05, 3600.0)]
    status_interval: Annotated[float, Range(0.05, 60.0)]
    #: Raw 32-byte Ed25519 private key (seed) of this node.
    private_key: Annotated[bytes, Blob(32, 32)]
    peer_key: Fingerprint
    #: Every key pinned for the peer (`peer_key` among them), each with its not-after time (unix seconds;
    #: 0 = none), in step: the worker accepts those not past their time at each handshake. () = peer_key only.
    peer_keys: Annotated[tuple[Fingerprint, ...], Items(PEER_KEYS_MAX)] = ()
    peer_keys_not_after: Annotated[tuple[Annotated[float, Range(0.0, 2.0**40)], ...], Items(PEER_KEYS_MAX)] = ()
    tunnel_addresses: Interfaces
    advertised_routes: Prefixes
    #: Sources allowed on packets read from TUN (local addresses + advertised).
    local_sources: Prefixes
    #: Sources allowed on packets from the peer (peer addresses + accepted + allowed).
    peer_sources: Prefixes
    engine: Engine
    event_loop: EventLoop
    #: CPU to pin this worker to; -1 = no pinning.
    cpu: Annotated[int, Range(-1, 4095)]
    #: User to switch to when started as root ("" = stay).
    user: Name
    log_level: Annotated[str, Text(16, r"debug|info|warning|error")]
    #: listen: the underlay address and port of the peer the previous worker of
    #: this queue last reported (None, 0: none). The new worker sends it
    #: RESTART_HINT at start, so the connector reconnects at once instead of
    #: at its next packet (docs/worker.md, "Sessions, liveness, reconnect").
    last_peer: AddressStr | None = None
    last_peer_port: Annotated[int, Range(0, 65535)] = 0
    #: REALITY (docs/protocol.md, "REALITY"); b"" = off. listen: the static X25519 private key;
    #: connect: the listener's REALITY public key.
    reality_key: Annotated[bytes, Blob(32)] = b""
    #: listen: the short ids accepted (none: any); connect: the one it sends (at most one).
    reality_short_ids: Annotated[tuple[ShortId, ...], Items(REALITY_SHORT_IDS_MAX)] = ()
    #: listen: the camouflage target that unauthenticated senders are relayed to ("" and 0: none, silence).
    camouflage_host: Hostname = ""
    camouflage_port: Annotated[int, Range(0, 65535)] = 0
    #: connect: the server name (SNI) of its ClientHello ("" = none).
    server_name: Hostname = ""


# ---- worker -> controller (bus) -------------------------------------------


@message("bus.worker_hello")
class WorkerHello(Message):
    network: NetworkName
    queue: QueueIndex
    pid: U32


@message("bus.worker_status")
class WorkerStatus(Message):
    """Sent every status interval; a worker silent too long is dead."""

    network: NetworkName
    queue: QueueIndex
    pid: U32
    state: SessionState
    #: Underlay address:port of the peer, "" when none.
    peer: Annotated[str, Text(64)]
    rtt_ms: Rtt
    #: Negotiated (accepted) MTU; 0 before the first READY.
    mtu: Annotated[int, Range(0, MTU_MAX)]
    counters: Counts
    drops: Counts
    queue_depth: U32
    seq_lost: U64
    #: Sessions established since the worker started.
    sessions: U32
    #: QUIC key updates this worker started (RFC 9001, 6).
    key_updates: U32
    last_error: Reason
    #: Fingerprint of the pinned key the active peer proved ("" without one): with several pinned, which.
    peer_key: Annotated[str, Text(64)] = ""


@message("bus.peer_routes")
class PeerRoutes(Message):
    """The peer's full advertised state for one session.

    Sent on READY and on every accepted ROUTE_UPDATE. The controller keeps the
    newest (session, epoch) per queue and ignores older ones.
    """

    network: NetworkName
    queue: QueueIndex
    session: U32
    epoch: U64
    routes: Prefixes
    tunnel_addresses: Interfaces


@message("bus.worker_exiting")
class WorkerExiting(Message):
    """Last words of a worker that stops on purpose or on a fatal error.

    `fatal` means a restart cannot help (bad ticket, bad key, config refused).
    `remote` means the worker ended on input from the network (an exception
    while handling a received datagram): what a peer or a stranger sent, not
    a local fault, so the controller restarts it without counting a crash.
    """

    network: NetworkName
    queue: QueueIndex
    reason: Reason
    fatal: bool
    remote: bool


# ---- controller -> worker (bus) -------------------------------------------


@message("bus.heartbeat")
class Heartbeat(Message):
    """Sent periodically; a worker exits when the controller goes silent."""


@message("bus.shutdown")
class Shutdown(Message):
    """Close the peer session with CLOSE(code, reason) and exit."""

    reason: Reason


@message("bus.handover")
class Handover(Message):
    """The controller is stopping in order (SIGTERM/SIGINT) and leaves this worker running.

    The worker keeps carrying traffic; if no controller speaks to it within
    `grace` seconds it closes the peer session ("controller stopped") and
    exits. Any message of the next controller (it adopts the worker) cancels
    that. The sender's last message on the bus. Workers that predate it drop
    it as an undecodable frame and fall back to CONTROLLER_SILENCE_TIMEOUT.
    """

    grace: Seconds


@message("bus.advertise")
class Advertise(Message):
    """The network's advertised routes changed on reload (nothing else did).

    The worker sends the difference to the peer as a ROUTE_UPDATE with a new
    epoch and from now on accepts `local_sources` from its TUN; later
    sessions announce the new routes in READY.
    """

    network: NetworkName
    queue: QueueIndex
    advertised_routes: Prefixes
    local_sources: Prefixes


@message("bus.reregister")
class Reregister(Message):
    """A restarted helper lost the steering map of a shared port (docs/helper.md, "Shared port"): the worker
    registers its UDP socket again (`ProtectSocket` with this fresh ticket of its queue); the helper attaches
    its new program with the first registration and puts each socket in its new map."""

    network: NetworkName
    queue: QueueIndex
    ticket: Ticket


@message("bus.rekey")
class Rekey(Message):
    """A reload changed the network's key (or the contents of its key file), its pinned peer keys or what
    the peer may send from: the worker applies them to the running session, renewing it without a gap
    where they no longer match it (docs/protocol.md, "Renewal"). Fields as in `WorkerConfig`."""

    network: NetworkName
    queue: QueueIndex
    private_key: Annotated[bytes, Blob(32, 32)]
    peer_key: Fingerprint
    peer_keys: Annotated[tuple[Fingerprint, ...], Items(PEER_KEYS_MAX)] = ()
    peer_keys_not_after: Annotated[tuple[Annotated[float, Range(0.0, 2.0**40)], ...], Items(PEER_KEYS_MAX)] = ()
    peer_sources: Prefixes = ()


# ---- CLI <-> controller ----------------------------------------------------


@message("cli.status")
class StatusRequest(Message):
    verbose: bool


@message("cli.up")
class UpRequest(Message):
    name: NetworkName


@message("cli.down")
class DownRequest(Message):
    name: NetworkName


@message("cli.reload")
class ReloadRequest(Message):
    pass


@record
class QueueStatus(Record):
    queue: QueueIndex
    pid: U32
    state: SessionState
    peer: Annotated[str, Text(64)]
    rtt_ms: Rtt
    mtu: Annotated[int, Range(0, MTU_MAX)]
    counters: Counts
    drops: Counts
    queue_depth: U32
    seq_lost: U64
    key_updates: U32
    restarts: U32
    last_error: Reason
    peer_key: Annotated[str, Text(64)] = ""
    #: Sessions its worker established since it started: above 1, the peer reconnected (or keys were renewed).
    sessions: U32 = 0


@record
class NetworkStatus(Record):
    name: NetworkName
    state: NetworkState
    interface: IfName
    role: PeerRole
    #: Underlay peer address and base port, as configured.
    peer: Annotated[str, Text(64)]
    port: U16
    #: `underlay.ports`: every queue on `port` (shared), or queue k on port + k (per-queue).
    ports: UnderlayPorts = UnderlayPorts.SHARED
    addresses: Interfaces
    peer_addresses: Interfaces
    mtu: Annotated[int, Range(0, MTU_MAX)]
    rtt_ms: Rtt
    counters: Counts
    drops: Counts
    restarts: U32
    routes: Prefixes
    last_error: Reason
    queues: Annotated[tuple[QueueStatus, ...], Items(MAX_QUEUES)]
    #: The keys the peers of its queues proved (fingerprints, each once): which key the peer uses now.
    peer_keys: Annotated[tuple[Annotated[str, Text(64)], ...], Items(MAX_QUEUES)] = ()
    #: Our key's fingerprint, as the running workers have it ("": not running).
    local_key: Annotated[str, Text(64)] = ""
    #: The current underlay path: the peer's address and port each queue talks to now, each once.
    paths: Annotated[tuple[Annotated[str, Text(64)], ...], Items(MAX_QUEUES)] = ()
    #: The interface's MTU (`mtu` above is the smallest negotiated one once a session runs).
    interface_mtu: Annotated[int, Range(0, MTU_MAX)] = 0
    #: Where the MTU came from: "config", "auto" or "auto-fallback" ("" : not running).
    mtu_source: Annotated[str, Text(16)] = ""
    #: For "auto": the path it was derived from, or why it fell back.
    mtu_note: Reason = ""


@message("cli.status_reply")
class StatusReply(Message):
    controller_pid: U32
    uptime: Seconds
    node_id: NodeId
    networks: Annotated[tuple[NetworkStatus, ...], Items(256)]


@message("cli.result")
class CommandResult(Message):
    ok: bool
    message: Reason
    errors: Annotated[tuple[Reason, ...], Items(1024)]


@message("cli.failed")
class CommandFailed(Message):
    code: ErrorCode
    reason: Reason


WORKER_CONFIG = Channel("worker-config", WORKER_CONFIG_MAX, (WorkerConfig,))
BUS_UP = Channel("bus-up", BUS_MESSAGE_MAX, (WorkerHello, WorkerStatus, PeerRoutes, WorkerExiting))
BUS_DOWN = Channel("bus-down", BUS_MESSAGE_MAX, (Heartbeat, Shutdown, Advertise, Handover, Rekey, Reregister))
CLI_REQUESTS = Channel("cli-request", CLI_MESSAGE_MAX, (StatusRequest, UpRequest, DownRequest, ReloadRequest))
CLI_REPLIES = Channel("cli-reply", CLI_MESSAGE_MAX, (StatusReply, CommandResult, CommandFailed))
