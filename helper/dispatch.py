"""The closed request table (OpenSSH `mon_table` style). Pure.

Theory of operation
-------------------
Each connection is a `Session` holding the peer's SO_PEERCRED and, after
Hello, its role. `Dispatcher.handle` looks the request type up in `TABLE`:
a type that is not there, a request before Hello, a role not listed for it,
or a second use of a once-only request raises `Violation`; the server then
audits it and closes that one connection. Anything else reaches its handler.
A handler either returns an `Outcome` (reply, plus the fd to pass along with
a `QueueGranted`) or raises `Refused`, which becomes an ordinary `Failed`
reply. Every privileged action and every refusal writes one audit record.
The kernel is reached only through the injected `Kernel` protocol.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.helper_messages import (
    HELPER_PROTOCOL, AddRoutes, ClaimQueue, CreateNetwork, DestroyNetwork, Failed, Hello, ListNetworks,
    NetworkCreated, NetworkDestroyed, NetworkInfo, NetworkList, ProtectSocket, QueueGranted, RemoveRoutes,
    Role, RoutesChanged, SocketProtected, Welcome,
)
from l3ptp.ipc.schema import Message

from .policy import Policy
from .state import Network, State
from .validate import Refused, check_address, check_ifname, check_mtu, check_prefix


class Kernel(Protocol):
    """What the dispatcher may ask of the kernel (netops.Host in production)."""

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int) -> tuple[int, list[int]]: ...
    def destroy_network(self, ifname: str, ifindex: int, fds: list[int], routes: list[str]) -> None: ...
    def add_route(self, ifindex: int, prefix: str, metric: int) -> None: ...
    def remove_route(self, ifindex: int, prefix: str) -> None: ...
    def protect_socket(self, fd: int) -> None: ...


Audit = Callable[..., None]


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclasses.dataclass(slots=True)
class Session:
    peer: Peer
    role: Role | None = None
    used: set[type] = dataclasses.field(default_factory=set)


class Violation(Exception):
    """A protocol violation: the connection must be closed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    reply: Message
    fd: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    handler: str
    roles: frozenset[Role] | None  # None: any (only Hello)
    once: bool = False


_C, _W = frozenset({Role.CONTROLLER}), frozenset({Role.WORKER})
TABLE: dict[type, Rule] = {
    Hello: Rule("handle_hello", None, once=True),
    CreateNetwork: Rule("handle_create_network", _C),
    AddRoutes: Rule("handle_add_routes", _C),
    RemoveRoutes: Rule("handle_remove_routes", _C),
    DestroyNetwork: Rule("handle_destroy_network", _C),
    ListNetworks: Rule("handle_list_networks", _C),
    ClaimQueue: Rule("handle_claim_queue", _W, once=True),
    ProtectSocket: Rule("handle_protect_socket", _W),
}


def _os_refusal(exc: OSError, what: str) -> Refused:
    code = {
        errno.EBUSY: ErrorCode.BUSY,
        errno.EEXIST: ErrorCode.EXISTS,
        errno.ENOENT: ErrorCode.NOT_FOUND,
        errno.ESRCH: ErrorCode.NOT_FOUND,
        errno.EPERM: ErrorCode.NOT_PERMITTED,
        errno.EACCES: ErrorCode.NOT_PERMITTED,
    }.get(exc.errno or 0, ErrorCode.SYSTEM)
    return Refused(code, f"{what}: {errno.errorcode.get(exc.errno or 0, 'error')} {exc.strerror or exc}")


class Dispatcher:
    def __init__(self, policy: Policy, state: State, kernel: Kernel, audit: Audit, clock: Callable[[], float]) -> None:
        self.policy, self.state, self.kernel, self.audit, self.clock = policy, state, kernel, audit, clock

    def _audit(self, s: Session, action: str, result: str, **fields: Any) -> None:
        self.audit(action, peer=s.peer, role=s.role, result=result, **fields)

    def violation(self, s: Session, action: str, reason: str) -> None:
        """Audit a protocol violation; the caller closes the connection."""
        self._audit(s, action, "violation", reason=reason)

    def handle(self, s: Session, req: Message, fds: Sequence[int] = ()) -> Outcome:
        """Handle one decoded request with the `fds` received alongside it.

        Never closes or keeps `fds` (the server closes them all afterwards).
        Raises `Violation` (already audited) when the connection must close.
        """
        action = type(req).__name__
        rule = TABLE.get(type(req))
        reason = None
        if rule is None:
            reason = "request not in table"
        elif s.role is None and type(req) is not Hello:
            reason = "request before hello"
        elif rule.roles is not None and s.role not in rule.roles:
            reason = f"not allowed for role {s.role}"
        elif rule.once and type(req) in s.used:
            reason = "once-only request repeated"
        elif type(req) is ProtectSocket and len(fds) != 1:
            reason = f"expected exactly one fd, got {len(fds)}"
        if reason is not None:
            self.violation(s, action, reason)
            raise Violation(reason)
        assert rule is not None
        s.used.add(type(req))
        if fds and type(req) is not ProtectSocket:
            self._audit(s, action, "fds_discarded", count=len(fds))
        if type(req) is ProtectSocket:
            return self.handle_protect_socket(s, fds[0])
        try:
            return getattr(self, rule.handler)(s, req)
        except Refused as exc:
            self._audit(s, action, "refused", code=exc.code.name, reason=exc.reason)
            return Outcome(Failed(code=exc.code, reason=exc.reason[:500]))

    # ---- handlers -----------------------------------------------------------

    def handle_hello(self, s: Session, req: Hello) -> Outcome:
        allowed = self.policy.controller_uids if req.role is Role.CONTROLLER else self.policy.worker_uids
        if req.protocol != HELPER_PROTOCOL:
            self.violation(s, "Hello", f"protocol {req.protocol} != {HELPER_PROTOCOL}")
            raise Violation("protocol mismatch")
        if s.peer.uid not in allowed:
            self.violation(s, "Hello", f"uid {s.peer.uid} may not act as {req.role}")
            raise Violation("uid not allowed for role")
        s.role = req.role
        self._audit(s, "Hello", "ok")
        return Outcome(Welcome(role=req.role, protocol=HELPER_PROTOCOL, uid=s.peer.uid))

    def _created(self, s: Session, net: Network, adopted: bool) -> Outcome:
        tickets = self.state.issue(net, self.clock())
        self._audit(s, "CreateNetwork", "ok", network=net.name, ifname=net.ifname, ifindex=net.ifindex,
                    queues=net.queues, worker_uid=net.worker_uid, adopted=adopted)
        return Outcome(NetworkCreated(name=net.name, ifname=net.ifname, ifindex=net.ifindex, tickets=tickets,
                                      ticket_ttl=self.state.ticket_ttl, adopted=adopted))

    def handle_create_network(self, s: Session, req: CreateNetwork) -> Outcome:
        p = self.policy
        check_ifname(req.ifname, p.interface_prefix)
        check_mtu(req.mtu)
        for a in req.addresses:
            check_address(a, p)
        if req.worker_uid not in p.worker_uids:
            raise Refused(ErrorCode.OUT_OF_POLICY, f"uid {req.worker_uid} is not a worker uid")
        if req.queues > p.max_queues:
            raise Refused(ErrorCode.LIMIT, f"at most {p.max_queues} queues")
        spec = (req.ifname, req.mtu, tuple(sorted(req.addresses)), req.queues, req.worker_uid)
        old = self.state.networks.get(req.name)
        if old is not None:
            if req.adopt and old.spec() == spec:
                return self._created(s, old, adopted=True)
            raise Refused(ErrorCode.EXISTS, f"network {req.name} exists" + (" with another spec" if req.adopt else ""))
        if self.state.by_ifname(req.ifname) is not None:
            raise Refused(ErrorCode.EXISTS, f"interface {req.ifname} belongs to another network")
        if len(self.state.networks) >= p.max_networks:
            raise Refused(ErrorCode.LIMIT, f"at most {p.max_networks} networks")
        try:
            ifindex, fds = self.kernel.create_network(req.ifname, req.mtu, tuple(req.addresses), req.queues)
        except OSError as exc:
            raise _os_refusal(exc, f"create {req.ifname}") from None
        net = Network(name=req.name, ifname=req.ifname, ifindex=ifindex, mtu=req.mtu, addresses=tuple(req.addresses),
                      queues=req.queues, worker_uid=req.worker_uid, fds=fds)
        self.state.add(net)
        return self._created(s, net, adopted=False)

    def _network(self, name: str) -> Network:
        net = self.state.networks.get(name)
        if net is None:
            raise Refused(ErrorCode.NOT_FOUND, f"no network {name}")
        return net

    def handle_claim_queue(self, s: Session, req: ClaimQueue) -> Outcome:
        net, queue = self.state.claim(req.ticket, s.peer.uid, self.clock())
        self._audit(s, "ClaimQueue", "ok", network=net.name, ifname=net.ifname, queue=queue)
        return Outcome(QueueGranted(name=net.name, ifname=net.ifname, queue=queue, mtu=net.mtu), fd=net.fds[queue])

    def handle_add_routes(self, s: Session, req: AddRoutes) -> Outcome:
        net = self._network(req.name)
        new = [r for r in dict.fromkeys(req.routes) if r not in net.routes]
        for r in new:
            check_prefix(r, self.policy, allow_default=req.allow_default)
        if len(net.routes) + len(new) > self.policy.max_routes:
            raise Refused(ErrorCode.LIMIT, f"at most {self.policy.max_routes} routes per network")
        done: list[str] = []
        try:
            for r in new:
                self.kernel.add_route(net.ifindex, r, req.metric)
                done.append(r)
        except OSError as exc:
            for r in done:  # all or nothing
                self.kernel.remove_route(net.ifindex, r)
            raise _os_refusal(exc, f"add route {r}") from None
        net.routes.update((r, req.metric) for r in new)
        self._audit(s, "AddRoutes", "ok", network=net.name, ifname=net.ifname, added=new)
        return Outcome(RoutesChanged(name=net.name, routes=tuple(net.routes)))

    def handle_remove_routes(self, s: Session, req: RemoveRoutes) -> Outcome:
        net = self._network(req.name)
        foreign = [r for r in req.routes if r not in net.routes]
        if foreign:
            raise Refused(ErrorCode.NOT_FOUND, f"not routes of network {net.name}: {', '.join(foreign[:8])}")
        gone = list(dict.fromkeys(req.routes))
        for r in gone:
            try:
                self.kernel.remove_route(net.ifindex, r)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise _os_refusal(exc, f"remove route {r}") from None
            del net.routes[r]
        self._audit(s, "RemoveRoutes", "ok", network=net.name, ifname=net.ifname, removed=gone)
        return Outcome(RoutesChanged(name=net.name, routes=tuple(net.routes)))

    def handle_protect_socket(self, s: Session, fd: int) -> Outcome:
        """ProtectSocket with its one received fd (the server closes its copy after)."""
        try:
            self.kernel.protect_socket(fd)
        except Refused as exc:
            self._audit(s, "ProtectSocket", "refused", code=exc.code.name, reason=exc.reason)
            return Outcome(Failed(code=exc.code, reason=exc.reason))
        except OSError as exc:
            r = _os_refusal(exc, "protect socket")
            self._audit(s, "ProtectSocket", "failed", code=r.code.name, reason=r.reason)
            return Outcome(Failed(code=r.code, reason=r.reason))
        self._audit(s, "ProtectSocket", "ok", mark=self.policy.socket_mark)
        return Outcome(SocketProtected(mark=self.policy.socket_mark))

    def destroy(self, net: Network) -> list[str]:
        self.state.forget(net.name)
        routes = list(net.routes)
        self.kernel.destroy_network(net.ifname, net.ifindex, net.fds, routes)
        return routes

    def handle_destroy_network(self, s: Session, req: DestroyNetwork) -> Outcome:
        net = self._network(req.name)
        try:
            routes = self.destroy(net)
        except OSError as exc:
            raise _os_refusal(exc, f"destroy {net.ifname}") from None
        self._audit(s, "DestroyNetwork", "ok", network=net.name, ifname=net.ifname, routes_removed=routes)
        return Outcome(NetworkDestroyed(name=net.name, routes_removed=tuple(routes)))

    def handle_list_networks(self, s: Session, req: ListNetworks) -> Outcome:
        infos = tuple(
            NetworkInfo(name=n.name, ifname=n.ifname, ifindex=n.ifindex, mtu=n.mtu, queues=n.queues,
                        addresses=n.addresses, routes=tuple(n.routes), worker_uid=n.worker_uid)
            for n in self.state.networks.values()
        )
        return Outcome(NetworkList(networks=infos))
