"""The kernel side of the helper: TUN ioctls and pyroute2 netlink. A shell; `Kernel` is dispatch's kernel.

Routes carry the policy's protocol and table, rules its protocol and our priorities: removal, `adopt` and
`cleanup` match exactly those, and links with our prefix that are TUN devices. NetlinkError becomes OSError; `ok`
lists errnos that count as success.

Kill switch: each TUN is IFF_PERSIST and named in its ifalias (`ALIAS`name:queues:worker_uid, then `VNET` for a
device with TUN offloads), outlives the helper and workers, and a restarted helper `adopt`s it (queues re-opened by
name in the recorded mode, detached until claimed). Every prefix a
network routes or addresses also has an `unreachable` route of ours at KILL_SWITCH_METRIC (docs/helper.md).
"""

import errno
import fcntl
import ipaddress
import os
import socket
from typing import Any

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from l3ptp.ipc.constants import KILL_SWITCH_METRIC
from l3ptp.ipc.constants import ROUTE_TABLE_DEFAULT as RT_MAIN
from l3ptp.ipc.errors import ErrorCode

from .policy import Policy, PolicyRefused
from .reuseport import Steering, SteeringUnavailable
from .state import VNET

TUNSETOWNER, TUNSETPERSIST, TUNSETQUEUE = 0x400454CC, 0x400454CB, 0x400454D9
IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE, RTN_UNICAST, RTN_UNREACHABLE, ALIAS = 0x0200, 0x0400, 1, 7, "l3ptp:"
TUN_FLAGS = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE
TUN_EACCES = ("cannot open /dev/net/tun: the helper's user needs read-write access to it (the kernel still requires "
              "CAP_NET_ADMIN); the package's tmpfiles.d/l3ptp.conf grants it at boot, now: systemd-tmpfiles --create l3ptp.conf")
IFA_F_NODAD, FIB_RULE_INVERT, UNSET = 0x02, 0x2, 2**32 - 1
#: TUN offloads (docs/helper.md): every packet carries a virtio_net_hdr. The flag is the device's, set by the queue
#: that creates it (or re-opens it when no queue is attached): the device records it at the end of its ifalias so a
#: restarted helper re-opens it in the same mode, and the worker reads it back with TUNGETIFF.
IFF_VNET_HDR = 0x4000
ADDR_GEN_MODE_NONE = 1  # IN6_ADDR_GEN_MODE_NONE
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
RuleKey = tuple[int, int, int | None, int | None, bool]  # priority, table, fwmark, suppress_prefixlength, "not"


def _nl(fn: Any, *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in ok:
            raise OSError(exc.code, os.strerror(exc.code)) from None


def set_queue(fd: int, flags: int) -> None:
    """TUNSETQUEUE: IFF_ATTACH_QUEUE or IFF_DETACH_QUEUE (a detached queue gets no packets)."""
    fcntl.ioctl(fd, TUNSETQUEUE, bytes(16) + flags.to_bytes(2, "little") + bytes(22))


def open_queues(ifname: str, queues: int, owner_uid: int, *, adopt: bool = False, vnet: bool = False) -> list[int]:
    """Create `ifname` with `queues` queues (close-on-exec fds); queue 0 is IFF_TUN_EXCL: EBUSY if it exists.
    With `adopt`, open `queues` more queues of the existing device, detached (its workers keep theirs).
    `vnet`: with IFF_VNET_HDR (TUN offloads)."""
    fds: list[int] = []
    base = TUN_FLAGS | IFF_VNET_HDR * vnet
    try:
        for flags in [base | pytun.IFF_TUN_EXCL * (not adopt)] + [base] * (queues - 1):
            dev = pytun.TunTapDevice(name=ifname, flags=flags)
            fds.append(os.dup(dev.fileno()))
            dev.close()
            if adopt:
                set_queue(fds[-1], IFF_DETACH_QUEUE)
            elif len(fds) == 1:  # at once: any user may attach a queue to an ownerless multi-queue TUN
                fcntl.ioctl(fds[0], TUNSETOWNER, owner_uid)
                fcntl.ioctl(fds[0], TUNSETPERSIST, 1)  # outlives every fd: see the module docstring
    except BaseException as exc:
        for fd in fds:
            os.close(fd)
        if isinstance(exc, OSError) and exc.errno == errno.EACCES and not fds:
            raise PermissionError(errno.EACCES, TUN_EACCES) from None
        raise
    return fds


class Kernel:
    def __init__(self, policy: Policy) -> None:
        self.policy, self.ipr, self.steering = policy, IPRoute(), Steering()

    def close(self) -> None:
        self.steering.close()
        self.ipr.close()

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int,
                       alias: str) -> tuple[int, list[int]]:
        fds = open_queues(ifname, queues, os.geteuid(), vnet=alias.endswith(VNET))
        try:
            index = _nl(self.ipr.link_lookup, ifname=ifname)[0]
            # No IPv6 link-local address: a point-to-point L3 tunnel needs none, and
            # without it the kernel sends no RS/MLD from fe80:: into the tunnel.
            _nl(self.ipr.link, "set", index=index, mtu=mtu, ifalias=ALIAS + alias,
                IFLA_AF_SPEC={"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE)]})]})
            for a in map(ipaddress.ip_interface, addresses):  # IPv6 without DAD: usable at once
                _nl(self.ipr.addr, "add", index=index, address=str(a.ip), prefixlen=a.network.prefixlen,
                    flags=IFA_F_NODAD if a.version == 6 else 0)
            _nl(self.ipr.link, "set", index=index, state="up")
        except BaseException:
            self._drop_link(ifname, fds)
            raise
        return index, fds

    def _drop_link(self, ifname: str, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        fds.clear()
        # A worker may still hold a queue, which keeps the device: delete it explicitly.
        for index in _nl(self.ipr.link_lookup, ifname=ifname):
            _nl(self.ipr.link, "del", index=index, ok=(errno.ENODEV,))

    def destroy_network(self, ifname: str, ifindex: int, fds: list[int], routes: list[str]) -> None:
        for r in routes:
            self._route("del", r, oif=ifindex, ok=(errno.ESRCH, errno.ENODEV))
        self._drop_link(ifname, fds)

    def _route(self, op: str, prefix: str, **extra: Any) -> None:
        net = ipaddress.ip_network(prefix)
        _nl(self.ipr.route, op, family=FAMILY[net.version], dst=str(net.network_address), dst_len=net.prefixlen,
            proto=self.policy.route_protocol, table=self.policy.route_table, **extra)

    def kill_switch(self, op: str, prefix: str) -> None:
        """Add or delete (idempotently) the `unreachable` route of ours for `prefix`."""
        self._route(op, prefix, type="unreachable", priority=KILL_SWITCH_METRIC, ok=(errno.EEXIST, errno.ESRCH))

    def attach(self, fd: int) -> None:
        set_queue(fd, IFF_ATTACH_QUEUE)

    def add_route(self, ifindex: int, prefix: str, metric: int) -> None:
        self._route("add", prefix, oif=ifindex, priority=metric)

    def remove_route(self, ifindex: int, prefix: str) -> None:
        self._route("del", prefix, oif=ifindex, ok=(errno.ESRCH,))

    def protect_socket(self, fd: int) -> None:
        """Set SO_MARK on an IPv4/IPv6 UDP socket."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise PolicyRefused(ErrorCode.BAD_REQUEST, "fd is not a socket") from None
        try:
            if (sock.family not in FAMILY.values() or sock.type != socket.SOCK_DGRAM
                    or sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_UDP):
                raise PolicyRefused(ErrorCode.BAD_REQUEST, "fd is not an IPv4/IPv6 UDP socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.policy.socket_mark)
        finally:
            sock.detach()

    def steer_socket(self, network: str, queues: int, queue: int, fd: int) -> None:
        """Steer `network`'s port: the SO_REUSEPORT UDP socket `fd` serves `queue` (helper/reuseport.py)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise PolicyRefused(ErrorCode.BAD_REQUEST, "fd is not a socket") from None
        try:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                raise PolicyRefused(ErrorCode.BAD_REQUEST, "a shared-port socket needs SO_REUSEPORT before bind")
        finally:
            sock.detach()
        try:
            self.steering.register(network, queues, queue, fd)
        except SteeringUnavailable as exc:
            raise PolicyRefused(ErrorCode.SYSTEM, str(exc.strerror)) from None

    def steer_network(self, network: str, queues: int, kept: int | None) -> tuple[int | None, str]:
        """`network`'s steering map (made now, or on the map the controller `kept`; helper/reuseport.py) and how
        it came; (None, why) when the kernel refuses (its ProtectSocket then fails and says so)."""
        try:
            return self.steering.create(network, queues, kept)
        except SteeringUnavailable as exc:
            return None, str(exc.strerror)

    def unsteer(self, network: str) -> None:
        self.steering.drop(network)

    def wanted_rules(self) -> list[RuleKey]:
        """P: fwmark M lookup main. With a table T also wg-quick's P+1: lookup main suppress_prefixlength 0
        (specific main routes win) and P+2: not fwmark M lookup T (our marked packets never reach T)."""
        p, prio = self.policy, self.policy.rule_priority
        rules: list[RuleKey] = [(prio, RT_MAIN, p.socket_mark, None, False)]
        if p.route_table != RT_MAIN:
            rules += [(prio + 1, RT_MAIN, None, 0, False), (prio + 2, p.route_table, p.socket_mark, None, True)]
        return rules

    def _rules(self, family: int) -> list[RuleKey]:
        """The rules in the kernel with our protocol, one of our priorities and main or our table."""
        p, out = self.policy, []
        for r in _nl(self.ipr.get_rules, family=family):
            suppress = r.get("FRA_SUPPRESS_PREFIXLEN", UNSET)
            key = (r.get("FRA_PRIORITY", 0), r.get("FRA_TABLE"), r.get("FRA_FWMARK"),
                   None if suppress == UNSET else suppress, bool(r["flags"] & FIB_RULE_INVERT))
            if (r.get("FRA_PROTOCOL") == p.route_protocol and key[1] in (RT_MAIN, p.route_table)
                    and p.rule_priority <= key[0] <= p.rule_priority + 2):
                out.append(key)
        return out

    def _rule(self, op: str, family: int, key: RuleKey) -> str:
        prio, table, mark, suppress, invert = key
        extra = {k: v for k, v in (("fwmark", mark), ("suppress_prefixlen", suppress)) if v is not None}
        _nl(self.ipr.rule, op, family=family, priority=prio, table=table, protocol=self.policy.route_protocol,
            flags=FIB_RULE_INVERT * invert, ok=(errno.EEXIST if op == "add" else errno.ENOENT,), **extra)
        return " ".join(x for x in ("inet" if family == socket.AF_INET else "inet6", f"{prio}:", "not" * invert,
                                    mark and f"fwmark {mark:#x}", f"lookup {table}",
                                    suppress is not None and f"suppress_prefixlength {suppress}") if x)

    def ensure_rules(self) -> list[str]:
        """Add whichever of `wanted_rules` are missing, IPv4 and IPv6; return what was added."""
        return [self._rule("add", family, k) for family in FAMILY.values()
                for have in [self._rules(family)] for k in self.wanted_rules() if k not in have]

    def _our_routes(self) -> list[tuple[int, dict[str, Any], str]]:
        """(family, route, "dst/len") of every route with our protocol in our table."""
        p = self.policy
        return [(f, r, f"{r.get('RTA_DST') or ('0.0.0.0' if f == socket.AF_INET else '::')}/{r['dst_len']}")
                for f in FAMILY.values() for r in _nl(self.ipr.get_routes, family=f, table=p.route_table)
                if r["proto"] == p.route_protocol and r.get("RTA_TABLE") == p.route_table]

    def _our_links(self) -> list[tuple[int, str, str]]:
        """(index, name, ifalias) of the TUN links with our prefix."""
        return [(link["index"], link.get("IFLA_IFNAME") or "", link.get("IFLA_IFALIAS") or "")
                for link in _nl(self.ipr.get_links)
                if (link.get("IFLA_IFNAME") or "").startswith(self.policy.interface_prefix)
                and link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "tun"]

    def adopt(self) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """Re-open the networks a previous helper left: (their Network fields, our TUNs deleted as no alias names
        them, our `unreachable` routes' prefixes). The caller decides what to keep."""
        nets, dropped = [], []
        routes = self._our_routes()
        for index, name, alias in self._our_links():
            try:
                offload = alias.endswith(VNET)
                net_name, queues, uid = alias.removeprefix(ALIAS).removesuffix(VNET).rsplit(":", 2)
                if not alias.startswith(ALIAS) or not 1 <= int(queues) <= self.policy.max_queues:
                    raise ValueError(alias)
                fds = open_queues(name, int(queues), os.geteuid(), adopt=True, vnet=offload)
            except (ValueError, OSError):
                _nl(self.ipr.link, "del", index=index, ok=(errno.ENODEV,))
                dropped.append(name)
                continue
            link = _nl(self.ipr.get_links, index)[0]
            addrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in _nl(self.ipr.get_addr, index=index)]
            nets.append({"name": net_name, "ifname": name, "ifindex": index, "mtu": link.get("IFLA_MTU"),
                         "addresses": tuple(str(ipaddress.ip_interface(a)) for a in addrs), "queues": int(queues),
                         "worker_uid": int(uid), "offload": offload, "fds": fds, "detached": set(range(int(queues))),
                         "routes": {text: r.get("RTA_PRIORITY", 0) for _, r, text in routes
                                    if r["type"] == RTN_UNICAST and r.get("RTA_OIF") == index}})
        return nets, dropped, [text for _, r, text in routes if r["type"] == RTN_UNREACHABLE]

    def drop_rules(self) -> list[str]:
        return [self._rule("del", family, k) for family in FAMILY.values() for k in self._rules(family)]

    def cleanup(self) -> dict[str, list[str]]:
        """Delete everything of ours: our-prefix TUN links, our-protocol routes in our table, our rules."""
        gone: dict[str, list[str]] = {"links": [], "routes": [], "rules": []}
        for _, r, text in self._our_routes():
            self._route("del", text, scope=r["scope"], type=r["type"], ok=(errno.ESRCH,), **{k: v for k, v in (
                ("oif", r.get("RTA_OIF")), ("priority", r.get("RTA_PRIORITY"))) if v is not None})
            gone["routes"].append(text)
        gone["rules"] = self.drop_rules()
        for index, name, _ in self._our_links():
            _nl(self.ipr.link, "del", index=index, ok=(errno.ENODEV,))
            gone["links"].append(name)
        return gone
