"""Peer-advertised routes: what to accept and what to ask the helper for.

Pure. The worker of each queue forwards the peer's full advertised state as
`PeerRoutes(session, epoch, routes)` on READY and on every ROUTE_UPDATE.

Rules
-----
* Per queue, the newest ``(session, epoch)`` wins; a message with an equal or
  older pair is stale and ignored. A worker restart starts its session count
  again, so the caller calls `RouteTable.reset_queue` when a queue's worker
  is respawned (the routes stay installed until the new session says
  otherwise).
* A route is accepted only when the network has ``install_routes`` on, it is
  inside one of ``accepted_routes`` and, for a default route (``/0``), only
  with ``allow_default_route``. Refused routes are reported with a reason.
* What should be installed is the union of the accepted routes of every
  queue, at most ``MAX_ROUTES_PER_NETWORK`` (256, what one helper request
  carries). Each queue's peer may advertise 256 routes, so the union over
  queues could grow past it: a queue's routes that would take the union
  beyond the limit are refused ("network route limit ...") and stay so
  until room is made, never sent to the helper in a request its schema
  cannot carry. `RouteTable.changes` compares it with what the helper says is
  installed and returns the routes to add and to remove: a route the peer
  withdrew is removed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from l3ptp.controller.config import IPNetwork, NetworkConfig
from l3ptp.ipc.constants import MAX_ROUTES_PER_NETWORK

__all__ = ["AcceptedRoutes", "RefusedRoute", "RouteChanges", "RouteTable", "accept_routes"]


@dataclasses.dataclass(frozen=True, slots=True)
class RefusedRoute:
    route: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class AcceptedRoutes:
    """Result of one accepted (not stale) PeerRoutes."""

    accepted: frozenset[IPNetwork]
    refused: tuple[RefusedRoute, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RouteChanges:
    add: tuple[IPNetwork, ...] = ()
    remove: tuple[IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove)


def _sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def accept_routes(net: NetworkConfig, advertised: Iterable[str]) -> AcceptedRoutes:
    """Split advertised prefixes (strings from the bus) into accepted and refused."""
    accepted: set[IPNetwork] = set()
    refused: list[RefusedRoute] = []
    for text in advertised:
        try:
            route = ipaddress.ip_network(text, strict=True)
        except ValueError:
            refused.append(RefusedRoute(text, "not a valid prefix"))
            continue
        if not net.install_routes:
            refused.append(RefusedRoute(text, "install_routes is off"))
        elif route.prefixlen == 0 and not net.allow_default_route:
            refused.append(RefusedRoute(text, "default route and allow_default_route is off"))
        elif not any(route.version == a.version and route.subnet_of(a) for a in net.accepted_routes):  # type: ignore[arg-type]
            refused.append(RefusedRoute(text, "outside accepted_routes"))
        else:
            accepted.add(route)
    return AcceptedRoutes(frozenset(accepted), tuple(refused))


@dataclasses.dataclass(slots=True)
class _QueueRoutes:
    key: tuple[int, int] | None = None
    routes: frozenset[IPNetwork] = frozenset()
    #: What the peer advertised (judged again when a reload changes `accepted_routes`).
    advertised: tuple[str, ...] = ()


class RouteTable:
    """The routes one network wants, from its queues' newest peer state."""

    def __init__(self, net: NetworkConfig) -> None:
        self.net = net
        self._queues: dict[int, _QueueRoutes] = {}
        #: What the helper last reported as installed (RoutesChanged.routes).
        self.installed: frozenset[IPNetwork] = frozenset()

    def set_network(self, net: NetworkConfig) -> None:
        """The network's configuration changed in place (a reload): what the peers advertised is judged again
        by `net` (its `accepted_routes` may have changed), and so are later updates."""
        self.net = net
        for queue, q in self._queues.items():
            if q.key is not None:
                q.routes = self._judge(queue, q.advertised).accepted

    def on_peer_routes(self, queue: int, session: int, epoch: int, routes: Iterable[str]) -> AcceptedRoutes | None:
        """Apply one PeerRoutes. None when stale (an older or equal (session, epoch))."""
        q = self._queues.setdefault(queue, _QueueRoutes())
        key = (session, epoch)
        if q.key is not None and key <= q.key:
            return None
        q.advertised = tuple(routes)
        update = self._judge(queue, q.advertised)
        q.key, q.routes = key, update.accepted
        return update

    def _judge(self, queue: int, routes: Iterable[str]) -> AcceptedRoutes:
        """Which of `routes` (queue `queue`'s peer's) are accepted, within the network's route limit."""
        update = accept_routes(self.net, routes)
        others: set[IPNetwork] = set()
        for other, qr in self._queues.items():
            if other != queue:
                others |= qr.routes
        room = MAX_ROUTES_PER_NETWORK - len(others)
        new = sorted(update.accepted - others, key=_sort_key)
        if len(new) > room:
            over = new[max(room, 0):]
            reason = f"network route limit ({MAX_ROUTES_PER_NETWORK}) reached"
            update = AcceptedRoutes(update.accepted - frozenset(over),
                                 update.refused + tuple(RefusedRoute(str(r), reason) for r in over))
        return update

    def reset_queue(self, queue: int) -> None:
        """A new worker serves `queue`: its first session is not stale."""
        q = self._queues.get(queue)
        if q is not None:
            q.key = None

    def desired(self) -> frozenset[IPNetwork]:
        out: set[IPNetwork] = set()
        for q in self._queues.values():
            out |= q.routes
        return frozenset(out)

    def changes(self) -> RouteChanges:
        """Routes to add and remove so that the installed set matches `desired`."""
        want = self.desired()
        return RouteChanges(
            tuple(sorted(want - self.installed, key=_sort_key)),
            tuple(sorted(self.installed - want, key=_sort_key)),
        )

    def set_installed(self, routes: Iterable[str | IPNetwork]) -> None:
        self.installed = frozenset(ipaddress.ip_network(r) for r in routes)
