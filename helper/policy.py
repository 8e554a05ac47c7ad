"""The root-owned policy file (TOML) as a frozen `Policy`, and the checks of request values against it.

Nothing the unprivileged side sends can widen the policy. A check returns the normalised value or raises
`PolicyRefused(code, reason)`, which dispatch turns into a `Failed` reply and an audit line.
"""

import dataclasses
import ipaddress
import os
import pwd
import stat
import tomllib
from typing import Any

from l3ptp.ipc.constants import (HELPER_SOCKET_DEFAULT, IFNAME_ALLOWED, IFNAME_MAX, IFNAME_PREFIX_DEFAULT, MAX_NETWORKS,
                                 MAX_QUEUES, MAX_ROUTES_PER_NETWORK, MTU_MAX, MTU_MIN, ROUTE_TABLE_DEFAULT,
                                 RTPROT_L3PTP, RULE_PRIORITY_DEFAULT, SOCKET_MARK_DEFAULT)
from l3ptp.ipc.errors import ErrorCode

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """The policy file is missing, unsafe or invalid."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    controller_uids: frozenset[int]
    worker_uids: frozenset[int]
    socket_group: str | int | None = None
    socket_path: str = HELPER_SOCKET_DEFAULT
    interface_prefix: str = IFNAME_PREFIX_DEFAULT
    # Defaults are the configuration's own maxima (ipc.constants), so a configuration the controller
    # accepts never meets "helper: LIMIT" on these counts; a policy may only lower them.
    max_networks: int = MAX_NETWORKS
    max_queues: int = MAX_QUEUES
    max_routes: int = MAX_ROUTES_PER_NETWORK
    allowed_prefixes: tuple[IpNetwork, ...] = ()
    allow_default_route: bool = False
    route_protocol: int = RTPROT_L3PTP
    route_table: int = ROUTE_TABLE_DEFAULT
    socket_mark: int = SOCKET_MARK_DEFAULT
    rule_priority: int = RULE_PRIORITY_DEFAULT


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise PolicyError(f"{key}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _uid(key: str, value: Any) -> int:
    if not isinstance(value, str):
        return _int(key, value, 0, 2**32 - 2)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise PolicyError(f"{key}: unknown user {value!r}") from None


def _prefix(key: str, value: Any) -> IpNetwork:
    try:
        return ipaddress.ip_network(value, strict=True)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{key}: {exc}") from None


def _list(item: Any) -> Any:
    def parse(key: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise PolicyError(f"{key}: expected a list")
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))
    return parse


def _check(ok: Any, what: str) -> Any:
    def parse(key: str, value: Any) -> Any:
        if not ok(value):
            raise PolicyError(f"{key}: expected {what}, got {value!r}")
        return value
    return parse


_RANGES = {"max_networks": (1, MAX_NETWORKS), "max_queues": (1, MAX_QUEUES), "max_routes": (0, MAX_ROUTES_PER_NETWORK),
           "route_protocol": (5, 255),  # 0..4 belong to the kernel and tools: never touch routes with those
           "socket_mark": (1, 2**32 - 1), "rule_priority": (1, 32763)}  # P..P+2 stay before main's 32766
_FIELDS = {
    **{key: lambda k, v, r=r: _int(k, v, *r) for key, r in _RANGES.items()},
    "controller_uids": lambda k, v: frozenset(_list(_uid)(k, v)),
    "worker_uids": lambda k, v: frozenset(_list(_uid)(k, v)),
    "socket_group": lambda k, v: v if isinstance(v, str) and v else _int(k, v, 0, 2**32 - 2),
    "socket_path": _check(lambda v: isinstance(v, str) and v.startswith("/") and "\x00" not in v, "an absolute path"),
    "interface_prefix": _check(lambda v: isinstance(v, str) and 0 < len(v) <= IFNAME_MAX - 2 and v[0].isalpha()
                               and all(c in IFNAME_ALLOWED for c in v),
                               f"a letter, then at most {IFNAME_MAX - 3} of {IFNAME_ALLOWED!r}"),
    "allowed_prefixes": _list(_prefix),
    "allow_default_route": _check(lambda v: type(v) is bool, "true or false"),
    # 0 (unspec) and 253..255 except main (254) are special
    "route_table": lambda k, v: v if type(v) is int and v == ROUTE_TABLE_DEFAULT else _int(k, v, 1, 252),
}


def parse_policy(data: dict[str, Any]) -> Policy:
    """Validate a decoded TOML document (only the uid lists are required). Raises `PolicyError`."""
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PolicyError(f"unknown policy keys: {', '.join(unknown)}")
    for required in ("controller_uids", "worker_uids"):
        if required not in data:
            raise PolicyError(f"{required}: required")
    policy = Policy(**{key: _FIELDS[key](key, value) for key, value in data.items()})
    if policy.allow_default_route and policy.route_table == ROUTE_TABLE_DEFAULT:
        raise PolicyError("allow_default_route = true needs route_table other than 254 (main): a default route "
                          "through the tunnel in main would also catch the tunnel's own UDP packets")
    return policy


def load_policy(path: str, *, check_owner: bool = True) -> Policy:
    """Read the policy file (owned by root, not group/world-writable) and parse it. Raises `PolicyError`."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if check_owner and (st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                raise PolicyError(f"{path}: must be owned by root and not writable by group or others")
            data = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    return parse_policy(data)


class PolicyRefused(Exception):
    """A valid request the policy or the current state does not allow."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def check_ifname(name: str, prefix: str) -> str:
    """Our prefix, then 1+ allowed characters, at most IFNAME_MAX in all."""
    if not isinstance(name, str) or not 0 < len(name) <= IFNAME_MAX:
        raise PolicyRefused(ErrorCode.BAD_REQUEST, f"interface name must be 1..{IFNAME_MAX} characters")
    if any(c not in IFNAME_ALLOWED for c in name):
        raise PolicyRefused(ErrorCode.BAD_REQUEST, f"interface name {name!r} has characters outside {IFNAME_ALLOWED!r}")
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"interface name {name!r} is not {prefix!r} followed by a suffix")
    return name


def check_mtu(mtu: int) -> int:
    if type(mtu) is not int or not MTU_MIN <= mtu <= MTU_MAX:
        raise PolicyRefused(ErrorCode.BAD_REQUEST, f"MTU must be {MTU_MIN}..{MTU_MAX}")
    return mtu


def _inside(net: IpNetwork, policy: Policy) -> bool:
    return any(net.version == allowed.version and net.subnet_of(allowed) for allowed in policy.allowed_prefixes)


def check_prefix(prefix: str, policy: Policy, *, allow_default: bool) -> IpNetwork:
    """A route inside the allowed prefixes, or a default route if policy and request both allow it."""
    try:
        net = ipaddress.ip_network(prefix, strict=True)
    except (TypeError, ValueError):
        raise PolicyRefused(ErrorCode.BAD_REQUEST, f"{prefix!r} is not a prefix") from None
    if net.prefixlen == 0 and not (policy.allow_default_route and allow_default):
        raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"default route {net} not permitted")
    if net.prefixlen and not _inside(net, policy):
        raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"route {net} is outside the allowed prefixes")
    return net


def check_address(iface: str, policy: Policy) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """An interface address whose connected prefix is inside the allowed prefixes."""
    try:
        addr = ipaddress.ip_interface(iface)
    except (TypeError, ValueError):
        raise PolicyRefused(ErrorCode.BAD_REQUEST, f"{iface!r} is not an address/prefix") from None
    if addr.network.prefixlen == 0 or not _inside(addr.network, policy):
        raise PolicyRefused(ErrorCode.OUT_OF_POLICY, f"address {addr} is outside the allowed prefixes")
    return addr
