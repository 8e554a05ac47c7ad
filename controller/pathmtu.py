"""The underlay path MTU for ``mtu = "auto"``, as the kernel knows it (shell; the arithmetic is `mtu.py`).

The controller asks without privilege, without sending a packet and without
running a command:

* toward a peer (a connector's `underlay.peer`, resolved here if it is a
  name; a listener's optional `underlay.peer`): a UDP socket with
  IP_MTU_DISCOVER = IP_PMTUDISC_DO (IPV6_MTU_DISCOVER for IPv6), bound to
  `underlay.local` if that is set, connected to the peer's port, then
  getsockopt IP_MTU / IPV6_MTU: the route's MTU, or the smaller path MTU the
  kernel learnt from an ICMP "fragmentation needed" / "packet too big";
* a listener without `underlay.peer` cannot know whence its peer comes: it
  takes the largest MTU of the host's interfaces that are up, not loopback
  and not l3ptp's own (`interface_prefix`), by SIOCGIFMTU on the names
  `if_nameindex` lists (the process's own network namespace). The
  connector's smaller figure wins in the session's negotiation, and the
  worker answers larger packets from the TUN with ICMP "too big"
  (`worker/oversize.py`).

Any failure (no route, a name that does not resolve, no interface) falls
back to MTU_DEFAULT with the reason (`mtu.fallback`).
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable

from l3ptp.controller import mtu as mtus
from l3ptp.controller.config import NetworkConfig
from l3ptp.controller.config.model import IPAddress
from l3ptp.ipc.constants import (
    IFF_LOOPBACK,
    IFF_UP,
    IP_MTU,
    IP_MTU_DISCOVER,
    IP_PMTUDISC_DO,
    IPV6_MTU,
    IPV6_MTU_DISCOVER,
    IPV6_PMTUDISC_DO,
    SIOCGIFFLAGS,
    SIOCGIFMTU,
)

__all__ = ["choose", "interfaces_mtu", "route_mtu"]

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then a short (flags) or an int (mtu) in the union
_IFREQ_MTU = struct.Struct("16si20x")


def route_mtu(peer: IPAddress, port: int, local: IPAddress | None = None) -> int:
    """The path MTU toward `peer` (OSError if there is no route)."""
    v6 = peer.version == 6
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        if local is not None and not local.is_unspecified:
            s.bind((str(local), 0))
        s.connect((str(peer), port))
        return s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) if v6 else s.getsockopt(socket.IPPROTO_IP, IP_MTU)


def interfaces_mtu(exclude_prefix: str) -> int:
    """The largest MTU of the interfaces that are up, not loopback and not named `exclude_prefix`* (0: none)."""
    best = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            if exclude_prefix and name.startswith(exclude_prefix):
                continue
            raw = name.encode()[:15]
            try:
                flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(raw, 0)))[1]
                if not flags & IFF_UP or flags & IFF_LOOPBACK:
                    continue
                best = max(best, _IFREQ_MTU.unpack(fcntl.ioctl(s, SIOCGIFMTU, _IFREQ_MTU.pack(raw, 0)))[1])
            except OSError:
                continue  # gone meanwhile
    return best


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


async def _resolve(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def choose(
    net: NetworkConfig,
    interface_prefix: str,
    *,
    resolve: Resolver = _resolve,
    probe: Callable[[IPAddress, int, IPAddress | None], int] = route_mtu,
    interfaces: Callable[[str], int] = interfaces_mtu,
) -> mtus.MtuChoice:
    """The MTU `net` runs with: its own `mtu`, or for ``mtu = "auto"`` the one its underlay path gives."""
    if not net.mtu_auto:
        return mtus.fixed(net)
    u, cap = net.underlay, net.max_datagram_size
    peer = u.peer
    if isinstance(peer, str):
        try:
            found = [a for a in await resolve(peer, u.port) if u.local is None or a.version == u.local.version]
        except OSError as exc:
            return mtus.fallback(f"cannot resolve {peer} ({exc}): fell back to the default", cap)
        if not found:
            return mtus.fallback(f"{peer} has no address of underlay.local's family: fell back to the default", cap)
        peer = found[0]
    if peer is not None:
        try:
            path = probe(peer, u.port, u.local)
        except OSError as exc:
            return mtus.fallback(f"no path MTU toward {peer} ({exc.strerror or exc}): fell back to the default", cap)
        return mtus.derive(path, peer.version, mds_cap=cap, where=f"toward {peer}")
    version = u.local.version if u.local is not None else 4
    try:
        path = interfaces(interface_prefix)
    except OSError as exc:
        return mtus.fallback(f"cannot read the interfaces' MTU ({exc}): fell back to the default", cap)
    if not path:
        return mtus.fallback("no interface is up to take the MTU of: fell back to the default", cap)
    return mtus.derive(path, version, mds_cap=cap, where="(largest interface MTU: a listener without underlay.peer)")
