"""Messages between the helper and its clients (controller, workers).

Transport: one AF_UNIX SOCK_SEQPACKET connection per client; one message per
packet; a file descriptor travels as SCM_RIGHTS ancillary data with the replies
`QueueGranted` and `NetworkCreated` (with `steering`) and with the requests `ProtectSocket` and
`CreateNetwork` (at most one: the steering map the controller kept). See docs/helper.md for the
request table (who may send what, once-only rules, order).
"""

from __future__ import annotations

import enum
from typing import Annotated

from .constants import HELPER_MESSAGE_MAX, MAX_NETWORKS, MAX_QUEUES, MAX_ROUTES_PER_NETWORK, MTU_MAX, MTU_MIN
from .codec import Channel
from .errors import ErrorCode
from .schema import U16, U32, Items, Message, PrefixStr, Range, Record, message, record
from .types import IfName, Interfaces, NetworkName, Reason, Ticket

# 2: ListNetworks pages (after / more); 3: ProtectSocket names its network and queue; 4: CreateNetwork `steer`
# (the steering map made with the network, its fd kept by the controller across helper restarts)
HELPER_PROTOCOL = 4

Mtu = Annotated[int, Range(MTU_MIN, MTU_MAX)]
QueueCount = Annotated[int, Range(1, MAX_QUEUES)]
QueueIndex = Annotated[int, Range(0, MAX_QUEUES - 1)]
Routes = Annotated[tuple[PrefixStr, ...], Items(MAX_ROUTES_PER_NETWORK)]


class Role(enum.StrEnum):
    CONTROLLER = "controller"
    WORKER = "worker"


# ---- requests -------------------------------------------------------------


@message("helper.hello")
class Hello(Message):
    """First request on every connection: the role the client claims."""

    role: Role
    protocol: U16


@message("helper.create_network")
class CreateNetwork(Message):
    """Create a multi-queue TUN with addresses and MTU, link up.

    With `adopt`, an existing network of the same name and identical spec
    (a controller restarted) is kept and gets fresh tickets instead of an
    EXISTS error.
    """

    name: NetworkName
    ifname: IfName
    mtu: Mtu
    addresses: Interfaces
    queues: QueueCount
    worker_uid: U32
    adopt: bool
    #: TUN offloads: create the device with IFF_VNET_HDR (its workers split and coalesce; docs/helper.md).
    offload: bool = False
    #: The network's listener workers share one UDP port: the helper makes (or keeps) its steering map now and
    #: sends the controller the map's fd with the reply. An fd sent with this request is the map the controller
    #: kept from an earlier helper: used when it is a steering map of `queues` (helper/reuseport.py).
    steer: bool = False


@message("helper.claim_queue")
class ClaimQueue(Message):
    ticket: Ticket


@message("helper.add_routes")
class AddRoutes(Message):
    name: NetworkName
    routes: Routes
    metric: U32
    allow_default: bool


@message("helper.remove_routes")
class RemoveRoutes(Message):
    name: NetworkName
    routes: Routes


@message("helper.protect_socket")
class ProtectSocket(Message):
    """The UDP socket to protect travels as SCM_RIGHTS with this request.

    With `shared` the socket is one of `network`'s workers on the network's one UDP port (SO_REUSEPORT): the
    helper also puts it in the network's steering map at `queue` (docs/helper.md, "Shared port"). Allowed
    only for the (network, queue) this connection claimed, or with `ticket` (a fresh ticket for that queue,
    when a running worker registers again with a restarted helper).
    """

    network: NetworkName | None = None
    queue: QueueIndex = 0
    shared: bool = False
    ticket: Ticket | None = None


@message("helper.destroy_network")
class DestroyNetwork(Message):
    name: NetworkName


@message("helper.list_networks")
class ListNetworks(Message):
    """One page of the helper's networks, in name order: those named after `after` (None: from the first)."""

    after: NetworkName | None = None


# ---- replies ----------------------------------------------------------------


@message("helper.welcome")
class Welcome(Message):
    role: Role
    protocol: U16
    uid: U32


@message("helper.network_created")
class NetworkCreated(Message):
    name: NetworkName
    ifname: IfName
    ifindex: U32
    tickets: Annotated[tuple[Ticket, ...], Items(MAX_QUEUES)]
    ticket_ttl: float
    adopted: bool
    #: The network's steering map fd follows as SCM_RIGHTS (the controller keeps it for a restarted helper).
    steering: bool = False


@message("helper.queue_granted")
class QueueGranted(Message):
    """The queue fd follows as SCM_RIGHTS on this reply."""

    name: NetworkName
    ifname: IfName
    queue: QueueIndex
    mtu: Mtu


@message("helper.routes_changed")
class RoutesChanged(Message):
    """Routes the helper holds for the network after the change."""

    name: NetworkName
    routes: Routes


@message("helper.socket_protected")
class SocketProtected(Message):
    mark: U32
    #: The socket is its queue's on the network's shared port (a shared ProtectSocket).
    steered: bool = False


@message("helper.network_destroyed")
class NetworkDestroyed(Message):
    name: NetworkName
    routes_removed: Routes


@record
class NetworkInfo(Record):
    name: NetworkName
    ifname: IfName
    ifindex: U32
    mtu: Mtu
    queues: QueueCount
    addresses: Interfaces
    routes: Routes
    worker_uid: U32


@message("helper.network_list")
class NetworkList(Message):
    """As many networks as fit under HELPER_MESSAGE_MAX; with `more`, ask again after the last one."""

    networks: Annotated[tuple[NetworkInfo, ...], Items(MAX_NETWORKS)]
    more: bool = False


@message("helper.failed")
class Failed(Message):
    """An ordinary error reply: the request was valid but could not be done."""

    code: ErrorCode
    reason: Reason


HELPER_REQUESTS = Channel(
    "helper-request",
    HELPER_MESSAGE_MAX,
    (Hello, CreateNetwork, ClaimQueue, AddRoutes, RemoveRoutes, ProtectSocket, DestroyNetwork, ListNetworks),
)
HELPER_REPLIES = Channel(
    "helper-reply",
    HELPER_MESSAGE_MAX,
    (Welcome, NetworkCreated, QueueGranted, RoutesChanged, SocketProtected, NetworkDestroyed, NetworkList, Failed),
)
