"""The result types: frozen, slotted dataclasses that compare and hash by value.

A reload diffs old and new networks with ``==``. Lists are tuples; addresses
and prefixes are `ipaddress` objects. Field defaults are the schema's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from typing import Final, Literal, TypeAlias, TypeVar

from l3ptp.ipc.constants import (
    HELPER_SOCKET_DEFAULT,
    IFNAME_PREFIX_DEFAULT,
    METRICS_ADDRESS_DEFAULT,
    METRICS_PORT_DEFAULT,
    RUNTIME_DIR_DEFAULT,
    STATUS_INTERVAL,
)


IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Which side of the QUIC connection a network plays (values of ipc PeerRole).
Role: TypeAlias = Literal["listen", "connect"]

ADDRESS_TYPES: Final = (ipaddress.IPv4Address, ipaddress.IPv6Address)
INTERFACE_TYPES: Final = (ipaddress.IPv4Interface, ipaddress.IPv6Interface)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    """``[node]``: this node's identity."""

    id: str
    #: Absolute path of this node's private key (not checked for existence).
    key_file: str


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``[controller]``: local process settings. Field defaults are the schema's."""

    runtime_dir: str = RUNTIME_DIR_DEFAULT
    helper_socket: str = HELPER_SOCKET_DEFAULT
    interface_prefix: str = IFNAME_PREFIX_DEFAULT
    #: User a worker switches to when started as root; "" = none.
    worker_user: str = ""
    status_interval: float = STATUS_INTERVAL
    #: Group allowed to use the CLI socket; "" = none.
    admin_group: str = ""
    #: Authorise each CLI caller (root, own uid, admin_group, else polkit);
    #: control.sock is then 0666 instead of 0660 (controller/polkit.py).
    polkit: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint. Field defaults are the schema's."""

    enabled: bool = True
    address: IPAddress = ipaddress.ip_address(METRICS_ADDRESS_DEFAULT)
    port: int = METRICS_PORT_DEFAULT


@dataclasses.dataclass(frozen=True, slots=True)
class RealityConfig:
    """``[networks.<name>.reality]``: the QUIC REALITY credential (docs/protocol.md, "REALITY").

    listen: `private_key_file` (X25519, base64), the `short_ids` it accepts (none: any) and the optional
    `camouflage` target that unauthenticated senders are relayed to. connect: the listener's `public_key`,
    its `short_ids` (at most one, the one it sends) and the `server_name` of its ClientHello (by default
    the host of `camouflage`).
    """

    private_key_file: str = ""
    public_key: bytes = b""
    short_ids: tuple[bytes, ...] = ()
    camouflage_host: str = ""
    camouflage_port: int = 0
    server_name: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class UnderlayConfig:
    """``[networks.<name>.underlay]``: the UDP path the QUIC connections use.

    `local` is the bind address (listen) or optional source address (connect);
    `peer` is the address to connect to (connect) or an optional filter
    (listen). `ports` "shared" (the default): every queue uses UDP port `port`, each flow steered to its
    queue's worker by connection ID (docs/helper.md, "Shared port"); "per-queue": queue k uses ``port + k``.
    Both ends of a tunnel must say the same.
    """

    local: IPAddress | None
    #: connect: an IP address or a DNS name (resolved by the workers, again at each reconnect).
    peer: IPAddress | str | None
    port: int
    ports: str = "shared"


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkConfig:
    """``[networks.<name>]``: one point-to-point tunnel, fully validated.

    Invariants guaranteed by `parse_config`: at least one address family;
    every local tunnel address has a peer address of the same family, in the
    same subnet, with the same prefix length; `mtu` fits the DATAGRAM budget
    of `max_datagram_size`; every prefix is strict; every port of
    ``underlay.port .. underlay.port + queues - 1`` is valid.
    """

    name: str
    enabled: bool
    interface: str
    role: Role
    mtu: int
    max_datagram_size: int
    queues: int
    local_ipv4: ipaddress.IPv4Interface | None
    peer_ipv4: ipaddress.IPv4Interface | None
    local_ipv6: ipaddress.IPv6Interface | None
    peer_ipv6: ipaddress.IPv6Interface | None
    #: Prefixes we advertise to the peer (and may send from).
    advertised_routes: tuple[IPNetwork, ...]
    #: Routes to install: a peer-advertised route is installed only inside one of these.
    accepted_routes: tuple[IPNetwork, ...]
    #: Extra source prefixes accepted from the peer.
    allowed_sources: tuple[IPNetwork, ...]
    install_routes: bool
    allow_default_route: bool
    allow_overlap: bool
    route_metric: int
    keepalive_interval: float
    #: QUIC engine of the workers: one of `ENGINES`.
    engine: str
    #: Event loop of the workers: one of `EVENT_LOOPS`.
    event_loop: str
    #: TUN offloads: one of `OFFLOADS` ("auto": TSO/checksum offload and GRO where the kernel allows, "gro": GRO
    #: only, the default, "off").
    offload: str
    #: CPUs to pin workers to: queue k runs on cpus[k % len(cpus)]; () = no pinning.
    cpus: tuple[int, ...]
    #: Pinned peer key fingerprint, "SHA256:" + 43 characters of base64.
    peer_key: str
    #: Per-network private key override; "" = use the node's key_file.
    key_file: str
    underlay: UnderlayConfig
    #: QUIC REALITY; None = off (the listener answers every Initial as l3ptp).
    reality: RealityConfig | None = None
    #: Every key pinned for the peer, with its not-after time (unix seconds; 0.0 = none); () = `peer_key`
    #: alone. With `peer_keys` set, `peer_key` is the first of them (or the one given, listed first).
    peer_keys: tuple[tuple[str, float], ...] = ()
    #: ``mtu = "auto"``: `mtu` (MTU_DEFAULT, the fallback) and `max_datagram_size` (a cap, MAX_DATAGRAM_SIZE_MAX
    #: unless set) are replaced by what the underlay path gives when the network comes up (controller/mtu.py).
    mtu_auto: bool = False

    def addresses(self) -> tuple[IPInterface, ...]:
        """Local tunnel addresses (with prefix length), IPv4 first, then IPv6."""
        return tuple(a for a in (self.local_ipv4, self.local_ipv6) if a is not None)

    def peer_addresses(self) -> tuple[IPInterface, ...]:
        """The peer's tunnel addresses (with prefix length), IPv4 first, then IPv6."""
        return tuple(a for a in (self.peer_ipv4, self.peer_ipv6) if a is not None)

    def local_sources(self) -> tuple[IPNetwork, ...]:
        """Source prefixes allowed on packets read from our TUN device.

        The local tunnel addresses as host prefixes (/32, /128) followed by
        `advertised_routes`, without duplicates, in that order.
        """
        return unique([*(host_prefix(a) for a in self.addresses()), *self.advertised_routes])

    def peer_sources(self) -> tuple[IPNetwork, ...]:
        """Source prefixes accepted on packets from the peer (like WireGuard AllowedIPs).

        The peer's tunnel addresses as host prefixes, then `accepted_routes`,
        then `allowed_sources`, without duplicates, in that order.
        """
        hosts = (host_prefix(a) for a in self.peer_addresses())
        return unique([*hosts, *self.accepted_routes, *self.allowed_sources])

    def key_path(self, node: NodeConfig) -> str:
        """Private key file for this network: its own `key_file`, else the node's."""
        return self.key_file or node.key_file

    def queue_port(self, queue: int) -> int:
        """UDP port of queue `queue` (0-based); ValueError outside ``0..queues-1``."""
        if isinstance(queue, bool) or not isinstance(queue, int) or not 0 <= queue < self.queues:
            raise ValueError(f"queue {queue!r} is outside 0..{self.queues - 1}")
        return self.underlay.port + queue * (self.underlay.ports == "per-queue")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration file. `networks` keeps the file's order."""

    node: NodeConfig
    controller: ControllerConfig = ControllerConfig()
    metrics: MetricsConfig = MetricsConfig()
    networks: tuple[NetworkConfig, ...] = ()

    def network(self, name: str) -> NetworkConfig | None:
        """The network called `name`, or None."""
        for net in self.networks:
            if net.name == name:
                return net
        return None


def host_prefix(iface: IPInterface) -> IPNetwork:
    return ipaddress.ip_network(iface.ip)


_T = TypeVar("_T")


def unique(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))

