"""Checks of request values against the policy. Pure.

Each check returns the normalised value or raises `Refused(code, reason)`,
which dispatch turns into an ordinary `Failed` reply plus an audit line.
"""

from __future__ import annotations

import ipaddress

from l3ptp.ipc.constants import IFNAME_ALLOWED, IFNAME_MAX, MTU_MAX, MTU_MIN
from l3ptp.ipc.errors import ErrorCode

from .policy import IpNetwork, Policy


class Refused(Exception):
    """A valid request the policy or the current state does not allow."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def check_ifname(name: str, prefix: str) -> str:
    """An interface name: our prefix, then 1+ allowed characters, at most IFNAME_MAX."""
    if not isinstance(name, str) or not 0 < len(name) <= IFNAME_MAX:
        raise Refused(ErrorCode.BAD_REQUEST, f"interface name must be 1..{IFNAME_MAX} characters")
    if any(c not in IFNAME_ALLOWED for c in name) or name in (".", ".."):
        raise Refused(ErrorCode.BAD_REQUEST, f"interface name {name!r} has characters outside {IFNAME_ALLOWED!r}")
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise Refused(ErrorCode.OUT_OF_POLICY, f"interface name {name!r} is not {prefix!r} followed by a suffix")
    return name


def check_mtu(mtu: int) -> int:
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
        raise Refused(ErrorCode.BAD_REQUEST, f"MTU must be {MTU_MIN}..{MTU_MAX}")
    return mtu


def _inside(net: IpNetwork, policy: Policy) -> bool:
    return any(net.version == allowed.version and net.subnet_of(allowed) for allowed in policy.allowed_prefixes)


def check_prefix(prefix: str, policy: Policy, *, allow_default: bool) -> IpNetwork:
    """A route prefix inside the policy's allowed prefixes.

    A default route (/0) needs both `policy.allow_default_route` and the
    request's `allow_default`; it never has to be inside allowed_prefixes.
    """
    try:
        net = ipaddress.ip_network(prefix, strict=True)
    except (TypeError, ValueError):
        raise Refused(ErrorCode.BAD_REQUEST, f"{prefix!r} is not a prefix") from None
    if net.prefixlen == 0:
        if policy.allow_default_route and allow_default:
            return net
        raise Refused(ErrorCode.OUT_OF_POLICY, f"default route {net} not permitted")
    if not _inside(net, policy):
        raise Refused(ErrorCode.OUT_OF_POLICY, f"route {net} is outside the allowed prefixes")
    return net


def check_address(iface: str, policy: Policy) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An interface address whose connected prefix is inside the allowed prefixes."""
    try:
        addr = ipaddress.ip_interface(iface)
    except (TypeError, ValueError):
        raise Refused(ErrorCode.BAD_REQUEST, f"{iface!r} is not an address/prefix") from None
    if addr.network.prefixlen == 0 or not _inside(addr.network, policy):
        raise Refused(ErrorCode.OUT_OF_POLICY, f"address {addr} is outside the allowed prefixes")
    return addr
