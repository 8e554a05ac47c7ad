"""The kernel side of the helper: pyroute2 netlink plus tun.py. A shell.

`Host` satisfies `dispatch.Kernel`. Every route it adds carries the policy's
route protocol and table; removal and `reconcile` only ever match routes with
that protocol, and links with our prefix that are TUN devices. pyroute2's
NetlinkError becomes OSError so callers see one error type.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from l3ptp.ipc.errors import ErrorCode

from . import tun
from .policy import Policy
from .validate import Refused

T = TypeVar("T")
RT_TABLE_MAIN = 254
FIB_RULE_INVERT = 0x2


def _nl(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except NetlinkError as exc:
        raise OSError(exc.code, os.strerror(exc.code)) from None


class Host:
    def __init__(self, policy: Policy, ipr: Any = None) -> None:
        self.policy = policy
        self.ipr = ipr if ipr is not None else IPRoute()

    def close(self) -> None:
        self.ipr.close()

    # ---- links ----------------------------------------------------------------

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int) -> tuple[int, list[int]]:
        fds = tun.open_queues(ifname, queues, os.geteuid())
        try:
            index = _nl(self.ipr.link_lookup, ifname=ifname)[0]
            _nl(self.ipr.link, "set", index=index, mtu=mtu)
            for a in addresses:
                iface = ipaddress.ip_interface(a)
                _nl(self.ipr.addr, "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
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
            try:
                _nl(self.ipr.link, "del", index=index)
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    raise

    def _links(self) -> list[Any]:
        return list(_nl(self.ipr.get_links))

    def destroy_network(self, ifname: str, ifindex: int, fds: list[int], routes: list[str]) -> None:
        for r in routes:
            try:
                self.remove_route(ifindex, r)
            except OSError as exc:
                if exc.errno not in (errno.ESRCH, errno.ENODEV):
                    raise
        self._drop_link(ifname, fds)

    # ---- routes ---------------------------------------------------------------

    def _route(self, op: str, ifindex: int, prefix: str, **extra: Any) -> None:
        net = ipaddress.ip_network(prefix)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        _nl(self.ipr.route, op, family=family, dst=str(net.network_address), dst_len=net.prefixlen, oif=ifindex,
            proto=self.policy.route_protocol, table=self.policy.route_table, **extra)

    def add_route(self, ifindex: int, prefix: str, metric: int) -> None:
        self._route("add", ifindex, prefix, priority=metric)

    def remove_route(self, ifindex: int, prefix: str) -> None:
        self._route("del", ifindex, prefix)

    # ---- protected sockets ----------------------------------------------------

    def protect_socket(self, fd: int) -> None:
        """Set SO_MARK on a UDP socket (IPv4/IPv6) and ensure the bypass rules."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise Refused(ErrorCode.BAD_REQUEST, "fd is not a socket") from None
        try:
            domain = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
            if domain not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_DGRAM or proto != socket.IPPROTO_UDP:
                raise Refused(ErrorCode.BAD_REQUEST, "fd is not an IPv4/IPv6 UDP socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.policy.socket_mark)
        finally:
            sock.detach()
        self.ensure_rules()

    def ensure_rules(self) -> list[str]:
        """`fwmark M lookup main` at priority P (and, with a separate route table,
        `not fwmark M lookup T` at P+1), IPv4 and IPv6, tagged with our protocol."""
        p = self.policy
        wanted = [(RT_TABLE_MAIN, p.rule_priority, 0)]
        if p.route_table != RT_TABLE_MAIN:
            wanted.append((p.route_table, p.rule_priority + 1, FIB_RULE_INVERT))
        added = []
        for family in (socket.AF_INET, socket.AF_INET6):
            have = {
                (r.get("FRA_TABLE"), r.get("FRA_PRIORITY"), r["flags"] & FIB_RULE_INVERT)
                for r in _nl(self.ipr.get_rules, family=family)
                if r.get("FRA_FWMARK") == p.socket_mark and r.get("FRA_PROTOCOL") == p.route_protocol
            }
            for table, prio, flags in wanted:
                if (table, prio, flags) not in have:
                    _nl(self.ipr.rule, "add", family=family, fwmark=p.socket_mark, table=table, priority=prio,
                        protocol=p.route_protocol, flags=flags)
                    added.append(f"{'inet' if family == socket.AF_INET else 'inet6'} prio {prio} table {table}")
        return added

    # ---- reconcile --------------------------------------------------------------

    def reconcile(self, live: Mapping[str, int]) -> dict[str, list[str]]:
        """Delete our-prefix TUN links and our-protocol routes that `live`
        (ifname -> ifindex) does not own. Returns what was removed."""
        p = self.policy
        owned = set(live.values())
        routes: list[str] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in _nl(self.ipr.get_routes, family=family, table=p.route_table):
                if r["proto"] != p.route_protocol or r.get("RTA_TABLE") != p.route_table or r.get("RTA_OIF") in owned:
                    continue
                dst = f"{r.get('RTA_DST') or ('0.0.0.0' if family == socket.AF_INET else '::')}/{r['dst_len']}"
                try:
                    _nl(self.ipr.route, "del", family=family, dst_len=r["dst_len"], table=p.route_table,
                        proto=p.route_protocol, **({"dst": r.get("RTA_DST")} if r.get("RTA_DST") else {}),
                        **({"oif": r.get("RTA_OIF")} if r.get("RTA_OIF") else {}))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
                routes.append(dst)
        links: list[str] = []
        for link in self._links():
            name = link.get("IFLA_IFNAME") or ""
            kind = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
            if name.startswith(p.interface_prefix) and kind == "tun" and name not in live:
                _nl(self.ipr.link, "del", index=link["index"])
                links.append(name)
        return {"links": links, "routes": routes}
