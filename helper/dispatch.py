"""The closed request table (OpenSSH `mon_table` style), and the audit line. Pure.

`Dispatcher.handle` checks one request of a `ClientSession` (one connection) against `TABLE`: anything the table does
not allow is a `Violation` (audited; the server closes that connection). A handler returns an `Outcome` or raises
`PolicyRefused` (a `Failed` reply). The kernel is injected (netops.Kernel; tests: a fake); its errors are OSError or PolicyRefused.
"""

import dataclasses
import errno
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import structlog

from l3ptp.ipc.constants import HELPER_AUDIT_KEYS, HELPER_AUDIT_WINDOW, HELPER_MESSAGE_MAX, KILL_SWITCH_METRIC
from l3ptp.ipc.logsetup import LineLimiter
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.helper_messages import (HELPER_PROTOCOL, HELPER_REPLIES, AddRoutes, ClaimQueue, CreateNetwork,
                                       DestroyNetwork, Failed, Hello, ListNetworks, NetworkCreated, NetworkDestroyed, NetworkInfo, NetworkList,
                                       ProtectSocket, QueueGranted, RemoveRoutes, Role, RoutesChanged,
                                       SocketProtected, Welcome)
from l3ptp.ipc.schema import Message

from .policy import Policy, PolicyRefused, check_address, check_ifname, check_mtu, check_prefix
from .state import VNET, HelperState, Network


def audit(action: str, *, peer: Any = None, result: str, role: Any = None, **fields: Any) -> None:
    """One log line per privileged action and per refusal; peer None is the helper itself (reconcile)."""
    structlog.get_logger().info("audit", action=action, peer_uid=getattr(peer, "uid", None),
                                peer_pid=getattr(peer, "pid", None), role=None if role is None else str(role),
                                result=result, **fields)


class ClientCreds(NamedTuple):
    pid: int
    uid: int
    gid: int


@dataclasses.dataclass(slots=True)
class ClientSession:
    peer: ClientCreds
    since: float = 0.0  # when the connection was accepted (for the Hello timeout)
    last: float = 0.0  # when its last request came (for the idle time-out and eviction)
    role: Role | None = None
    used: set[type] = dataclasses.field(default_factory=set)
    claimed: tuple[str, int] | None = None  # (network, queue) of its ClaimQueue: its ProtectSocket may steer it


class Violation(Exception):
    """The connection must be closed."""


class Outcome(NamedTuple):
    reply: Message
    fd: int | None = None


class Rule(NamedTuple):
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
_ERRNO_CODES = {errno.EBUSY: ErrorCode.BUSY, errno.EEXIST: ErrorCode.EXISTS, errno.ENOENT: ErrorCode.NOT_FOUND,
                errno.ESRCH: ErrorCode.NOT_FOUND, errno.EPERM: ErrorCode.NOT_PERMITTED,
                errno.EACCES: ErrorCode.NOT_PERMITTED}


def _os_refusal(exc: OSError, what: str) -> PolicyRefused:
    return PolicyRefused(_ERRNO_CODES.get(exc.errno or 0, ErrorCode.SYSTEM),
                   f"{what}: {errno.errorcode.get(exc.errno or 0, 'error')} {exc.strerror or exc}")


class Dispatcher:
    def __init__(self, policy: Policy, state: HelperState, kernel: Any, audit: Callable[..., None],
                 clock: Callable[[], float]) -> None:
        self.policy, self.state, self.kernel, self.audit, self.clock = policy, state, kernel, audit, clock
        self.limiter = LineLimiter(HELPER_AUDIT_WINDOW, HELPER_AUDIT_KEYS)
        self.guards: set[str] = set()  # the kill-switch routes in the kernel

    def _audit(self, s: ClientSession, action: str, result: str, **fields: Any) -> None:
        """Write an audit line; but the controller's and privileged actions done, lines go through the limiter."""
        if s.role is not Role.CONTROLLER and (result != "ok" or action == "Hello") and not self.limiter.allow(
                (s.peer.uid, action, result, fields.get("code")), self.clock()):
            return
        self.audit(action, peer=s.peer, role=s.role, result=result, **fields)

    def flush_audit(self) -> None:
        """One summary line per kind of audit line held back in a window that has ended."""
        for (uid, action, result, code), n in self.limiter.due(self.clock()):
            self.audit(action, peer=ClientCreds(None, uid, None), result=result, suppressed=n, window=self.limiter.window,
                       **({} if code is None else {"code": code}),
                       summary=f"{result} {n} more from uid {uid} in the last {self.limiter.window:g} s")

    def violation(self, s: ClientSession, action: str, reason: str, result: str = "violation") -> None:
        """Audit a protocol violation (or a refused or timed-out connection); the caller closes the connection."""
        self._audit(s, action, result, reason=reason)

    def failure(self, s: ClientSession, action: str, exc: BaseException) -> Outcome:
        """A request that failed inside the helper (a bug): audited, answered `Failed(INTERNAL)`, state kept."""
        self._audit(s, action, "error", code=ErrorCode.INTERNAL.name, error=f"{type(exc).__name__}: {exc}"[:300])
        return Outcome(Failed(code=ErrorCode.INTERNAL, reason=f"helper internal error: {type(exc).__name__}"))

    def _kernel(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise _os_refusal(exc, what) from None

    def handle(self, s: ClientSession, req: Message, fds: Sequence[int] = ()) -> Outcome:
        """Handle a request and its `fds` (neither closed nor kept here); `Violation` is already audited."""
        kind, action, rule = type(req), type(req).__name__, TABLE.get(type(req))
        hello = req if isinstance(req, Hello) else None
        uids = self.policy.controller_uids if hello and hello.role is Role.CONTROLLER else self.policy.worker_uids
        reason = ("request not in table" if rule is None
                  else "request before hello" if s.role is None and hello is None
                  else f"not allowed for role {s.role}" if rule.roles is not None and s.role not in rule.roles
                  else "once-only request repeated" if rule.once and kind in s.used
                  else f"expected exactly one fd, got {len(fds)}" if kind is ProtectSocket and len(fds) != 1
                  else f"protocol {hello.protocol} != {HELPER_PROTOCOL}" if hello and hello.protocol != HELPER_PROTOCOL
                  else f"uid {s.peer.uid} may not act as {hello.role}" if hello and s.peer.uid not in uids
                  else None)
        if reason is not None or rule is None:
            self.violation(s, action, reason or "")
            raise Violation(reason)
        s.used.add(kind)
        takes = 1 if kind is ProtectSocket or kind is CreateNetwork else 0
        if len(fds) > takes:
            self._audit(s, action, "fds_discarded", count=len(fds) - takes)
        try:
            return getattr(self, rule.handler)(s, req, *fds[:takes])
        except PolicyRefused as exc:
            self._audit(s, action, "refused", code=exc.code.name, reason=exc.reason)
            return Outcome(Failed(code=exc.code, reason=exc.reason[:500]))

    def handle_hello(self, s: ClientSession, req: Hello) -> Outcome:
        s.role = req.role
        self._audit(s, "Hello", "ok")
        return Outcome(Welcome(role=req.role, protocol=HELPER_PROTOCOL, uid=s.peer.uid))

    def _created(self, s: ClientSession, net: Network, adopted: bool, req: CreateNetwork, kept: int | None) -> Outcome:
        """The reply, with the steering map's fd when `req.steer` (made now, or on the map `kept`)."""
        tickets = self.state.issue(net, self.clock())
        map_fd, how = self.kernel.steer_network(net.name, net.queues, kept) if req.steer else (None, "")
        self._audit(s, "CreateNetwork", "ok", network=net.name, ifname=net.ifname, ifindex=net.ifindex,
                    queues=net.queues, worker_uid=net.worker_uid, offload=net.offload, adopted=adopted,
                    **({"steering": how} if req.steer else {}))
        return Outcome(NetworkCreated(name=net.name, ifname=net.ifname, ifindex=net.ifindex, tickets=tickets,
                                      ticket_ttl=self.state.ticket_ttl, adopted=adopted, steering=map_fd is not None),
                       fd=map_fd)

    def handle_create_network(self, s: ClientSession, req: CreateNetwork, kept: int | None = None) -> Outcome:
        """CreateNetwork with the steering map the controller `kept`, if it sent one (the server closes its
        copy after; `Steering` keeps a dup when it uses it)."""
        p = self.policy
        check_ifname(req.ifname, p.interface_prefix)
        check_mtu(req.mtu)
        for a in req.addresses:
            check_address(a, p)
        if req.worker_uid not in p.worker_uids:
            raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"uid {req.worker_uid} is not a worker uid")
        if req.queues > p.max_queues:
            raise PolicyRefused(ErrorCode.LIMIT, f"at most {p.max_queues} queues")
        net = Network(name=req.name, ifname=req.ifname, ifindex=0, mtu=req.mtu, addresses=tuple(req.addresses),
                      queues=req.queues, worker_uid=req.worker_uid, fds=[], offload=req.offload)
        old = self.state.networks.get(req.name)
        if old is not None:
            if req.adopt and old.spec() == net.spec():
                return self._created(s, old, True, req, kept)
            raise PolicyRefused(ErrorCode.EXISTS, f"network {req.name} exists" + (" with another spec" if req.adopt else ""))
        if self.state.by_ifname(req.ifname) is not None:
            raise PolicyRefused(ErrorCode.EXISTS, f"interface {req.ifname} belongs to another network")
        if len(self.state.networks) >= p.max_networks:
            raise PolicyRefused(ErrorCode.LIMIT, f"at most {p.max_networks} networks")
        net.ifindex, net.fds = self._kernel(f"create {req.ifname}", self.kernel.create_network, req.ifname, req.mtu,
                                            net.addresses, req.queues,
                                            f"{req.name}:{req.queues}:{req.worker_uid}" + VNET * req.offload)
        self.state.add(net)
        try:
            self._guard(net.guarded())
        except PolicyRefused:
            self.destroy(net)
            raise
        return self._created(s, net, False, req, kept)

    def _guard(self, prefixes: set[str]) -> None:
        """Kill-switch routes for `prefixes` (before their tunnel routes: no window without either)."""
        for p in sorted(prefixes - self.guards):
            self._kernel(f"kill switch {p}", self.kernel.kill_switch, "add", p)
            self.guards.add(p)

    def _unguard(self) -> list[str]:
        """Drop the kill-switch routes no live network needs any more (a route or network explicitly removed)."""
        gone = sorted(self.guards.difference(*(n.guarded() for n in self.state.networks.values())))
        for p in gone:
            self.kernel.kill_switch("del", p)
        self.guards -= set(gone)
        return gone

    def _network(self, name: str) -> Network:
        if name in self.state.networks:
            return self.state.networks[name]
        raise PolicyRefused(ErrorCode.NOT_FOUND, f"no network {name}")

    def handle_claim_queue(self, s: ClientSession, req: ClaimQueue) -> Outcome:
        net, queue = self.state.claim(req.ticket, s.peer.uid, self.clock())
        if queue in net.detached:  # adopted: its packets went to the old worker's queue until now
            self._kernel("attach queue", self.kernel.attach, net.fds[queue])
            net.detached.discard(queue)
        s.claimed = (net.name, queue)
        self._audit(s, "ClaimQueue", "ok", network=net.name, ifname=net.ifname, queue=queue)
        return Outcome(QueueGranted(name=net.name, ifname=net.ifname, queue=queue, mtu=net.mtu), fd=net.fds[queue])

    def _ensure_rules(self, s: ClientSession) -> None:
        added = self._kernel("install rules", self.kernel.ensure_rules)
        if added:
            self._audit(s, "AddRules", "ok", rules=added)

    def handle_add_routes(self, s: ClientSession, req: AddRoutes) -> Outcome:
        net = self._network(req.name)
        new = [r for r in dict.fromkeys(req.routes) if r not in net.routes]
        for r in new:
            check_prefix(r, self.policy, allow_default=req.allow_default)
        if len(net.routes) + len(new) > self.policy.max_routes:
            raise PolicyRefused(ErrorCode.LIMIT, f"at most {self.policy.max_routes} routes per network")
        if req.metric >= KILL_SWITCH_METRIC:
            raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"metric {KILL_SWITCH_METRIC} is the kill switch's")
        if new:
            self._ensure_rules(s)
        try:
            self._guard(set(new))
            for i, r in enumerate(new):
                try:
                    self.kernel.add_route(net.ifindex, r, req.metric)
                except OSError as exc:
                    for done in new[:i]:  # all or nothing
                        self.kernel.remove_route(net.ifindex, done)
                    raise _os_refusal(exc, f"add route {r}") from None
        except PolicyRefused:
            self._unguard()
            raise
        net.routes.update((r, req.metric) for r in new)
        self._audit(s, "AddRoutes", "ok", network=net.name, ifname=net.ifname, added=new)
        return Outcome(RoutesChanged(name=net.name, routes=tuple(net.routes)))

    def handle_remove_routes(self, s: ClientSession, req: RemoveRoutes) -> Outcome:
        net = self._network(req.name)
        foreign = [r for r in req.routes if r not in net.routes]
        if foreign:
            raise PolicyRefused(ErrorCode.NOT_FOUND, f"not routes of network {net.name}: {', '.join(foreign[:8])}")
        gone = list(dict.fromkeys(req.routes))
        for r in gone:
            self._kernel(f"remove route {r}", self.kernel.remove_route, net.ifindex, r)
            del net.routes[r]
        self._kernel("kill switch", self._unguard)
        self._audit(s, "RemoveRoutes", "ok", network=net.name, ifname=net.ifname, removed=gone)
        return Outcome(RoutesChanged(name=net.name, routes=tuple(net.routes)))

    def handle_protect_socket(self, s: ClientSession, req: ProtectSocket, fd: int) -> Outcome:
        """ProtectSocket with its one received fd (the server closes its copy after): SO_MARK, and with
        `shared` the socket steered as its queue's on the network's one port (helper/reuseport.py)."""
        net = self._owned_queue(s, req) if req.shared else None
        self._kernel("protect socket", self.kernel.protect_socket, fd)
        self._ensure_rules(s)
        if net is not None:
            self._kernel("steer socket", self.kernel.steer_socket, net.name, net.queues, req.queue, fd)
        self._audit(s, "ProtectSocket", "ok", mark=self.policy.socket_mark,
                    **({"network": net.name, "queue": req.queue, "steered": True} if net is not None else {}))
        return Outcome(SocketProtected(mark=self.policy.socket_mark, steered=net is not None))

    def _owned_queue(self, s: ClientSession, req: ProtectSocket) -> Network:
        """The network of a shared-port ProtectSocket, if this worker owns `req.queue` of it: the queue it claimed
        on this connection, or one a fresh ticket names (a running worker registering with a restarted helper;
        the ticket is consumed, its TUN queue is not touched)."""
        if req.ticket is not None:
            net, queue = self.state.claim(req.ticket, s.peer.uid, self.clock())
            owned = (net.name, queue)
        else:
            owned = s.claimed if s.claimed is not None else ("", -1)
        if owned != (req.network, req.queue):
            raise PolicyRefused(ErrorCode.NOT_PERMITTED, f"queue {req.queue} of {req.network} is not this worker's")
        return self._network(owned[0])

    def destroy(self, net: Network) -> list[str]:
        self.state.forget(net.name)
        self.kernel.unsteer(net.name)
        routes = list(net.routes)
        self.kernel.destroy_network(net.ifname, net.ifindex, net.fds, routes)
        self._unguard()
        return routes

    def adopt(self, found: list[dict[str, Any]], guards: list[str]) -> dict[str, list[str]]:
        """At start: take over the networks a previous helper left (`Kernel.adopt`), destroy those outside the
        policy, and drop kill-switch routes no network needs (their device was deleted behind our back)."""
        self.guards = set(guards)
        done: dict[str, list[str]] = {"adopted": [], "destroyed": []}
        for net in (Network(**fields) for fields in found):
            if (net.worker_uid in self.policy.worker_uids and net.name not in self.state.networks
                    and len(self.state.networks) < self.policy.max_networks):
                self.state.add(net)
                try:
                    self._guard(net.guarded())
                    done["adopted"].append(net.name)
                    continue
                except PolicyRefused:
                    self.state.forget(net.name)
            self.kernel.destroy_network(net.ifname, net.ifindex, net.fds, list(net.routes))
            done["destroyed"].append(net.ifname)
        done["kill_switch_removed"] = self._unguard()
        return done

    def handle_destroy_network(self, s: ClientSession, req: DestroyNetwork) -> Outcome:
        net = self._network(req.name)
        routes = self._kernel(f"destroy {net.ifname}", self.destroy, net)
        self._audit(s, "DestroyNetwork", "ok", network=net.name, ifname=net.ifname, routes_removed=routes)
        return Outcome(NetworkDestroyed(name=net.name, routes_removed=tuple(routes)))

    def handle_list_networks(self, s: ClientSession, req: ListNetworks) -> Outcome:
        """The networks after `req.after` in name order, as many as fit under HELPER_MESSAGE_MAX (at least one:
        tests/unit/test_helper_limits.py). A page is at most the sum of each network's size on a page of its own."""
        names = sorted(n for n in self.state.networks if req.after is None or n > req.after)
        page: list[NetworkInfo] = []
        size = _EMPTY_PAGE + 2  # msgpack's array header grows by 2 bytes past 15 items (fixarray -> array16)
        for name in names:
            n = self.state.networks[name]
            info = NetworkInfo(name=n.name, ifname=n.ifname, ifindex=n.ifindex, mtu=n.mtu, queues=n.queues,
                               addresses=n.addresses, routes=tuple(n.routes), worker_uid=n.worker_uid)
            size += len(HELPER_REPLIES.encode(NetworkList(networks=(info,), more=True))) - _EMPTY_PAGE
            if page and size > HELPER_MESSAGE_MAX:
                break
            page.append(info)
        return Outcome(NetworkList(networks=tuple(page), more=len(page) < len(names)))


_EMPTY_PAGE = len(HELPER_REPLIES.encode(NetworkList(networks=(), more=True)))
