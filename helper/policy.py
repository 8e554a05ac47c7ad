"""The helper's root-owned policy file (TOML) as a frozen `Policy`.

Only the helper reads it; nothing the unprivileged side sends can widen it.
Every key is optional except the uid lists; any unknown key is an error, and so
is a value of the wrong type or outside its range. `parse_policy` is pure;
`load_policy` also checks that the file is owned by root and not writable by
group or others (skip with ``check_owner=False`` in tests run as non-root).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
import tomllib
from typing import Any

from l3ptp.ipc.constants import (
    HELPER_SOCKET_DEFAULT, IFNAME_ALLOWED, IFNAME_MAX, IFNAME_PREFIX_DEFAULT, MAX_NETWORKS, MAX_QUEUES,
    MAX_ROUTES_PER_NETWORK, ROUTE_TABLE_DEFAULT, RTPROT_L3PTP, RULE_PRIORITY_DEFAULT, SOCKET_MARK_DEFAULT,
)

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
    max_networks: int = 8
    max_queues: int = 16
    max_routes: int = MAX_ROUTES_PER_NETWORK
    allowed_prefixes: tuple[IpNetwork, ...] = ()
    allow_default_route: bool = False
    route_protocol: int = RTPROT_L3PTP
    route_table: int = ROUTE_TABLE_DEFAULT
    socket_mark: int = SOCKET_MARK_DEFAULT
    rule_priority: int = RULE_PRIORITY_DEFAULT


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PolicyError(f"{key}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _uids(key: str, value: Any) -> frozenset[int]:
    if not isinstance(value, list):
        raise PolicyError(f"{key}: expected a list of uids")
    return frozenset(_int(f"{key}[{i}]", v, 0, 2**32 - 2) for i, v in enumerate(value))


def _prefixes(key: str, value: Any) -> tuple[IpNetwork, ...]:
    if not isinstance(value, list):
        raise PolicyError(f"{key}: expected a list of prefixes")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(ipaddress.ip_network(v, strict=True))
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"{key}[{i}]: {exc}") from None
    return tuple(out)


def _prefix_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= IFNAME_MAX - 2:
        raise PolicyError(f"{key}: expected 1..{IFNAME_MAX - 2} characters")
    if any(c not in IFNAME_ALLOWED for c in value) or not value[0].isalpha():
        raise PolicyError(f"{key}: {value!r} must start with a letter and use only {IFNAME_ALLOWED!r}")
    return value


def _group(key: str, value: Any) -> str | int:
    if isinstance(value, str) and value:
        return value
    return _int(key, value, 0, 2**32 - 2)


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise PolicyError(f"{key}: expected an absolute path")
    return value


def _bool(key: str, value: Any) -> bool:
    if type(value) is not bool:
        raise PolicyError(f"{key}: expected true or false")
    return value


_FIELDS = {
    "controller_uids": _uids,
    "worker_uids": _uids,
    "socket_group": _group,
    "socket_path": _path,
    "interface_prefix": _prefix_name,
    "max_networks": lambda k, v: _int(k, v, 1, MAX_NETWORKS),
    "max_queues": lambda k, v: _int(k, v, 1, MAX_QUEUES),
    "max_routes": lambda k, v: _int(k, v, 0, MAX_ROUTES_PER_NETWORK),
    "allowed_prefixes": _prefixes,
    "allow_default_route": _bool,
    # 0..4 belong to the kernel and tools; never touch routes with those.
    "route_protocol": lambda k, v: _int(k, v, 5, 255),
    # 0 (unspec) and 253..255 except main (254) are special; allow main or 1..252.
    "route_table": lambda k, v: v if v == ROUTE_TABLE_DEFAULT else _int(k, v, 1, 252),
    "socket_mark": lambda k, v: _int(k, v, 1, 2**32 - 1),
    "rule_priority": lambda k, v: _int(k, v, 1, 32765),
}


def parse_policy(data: dict[str, Any]) -> Policy:
    """Validate a decoded TOML document. Raises `PolicyError`."""
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PolicyError(f"unknown policy keys: {', '.join(unknown)}")
    for required in ("controller_uids", "worker_uids"):
        if required not in data:
            raise PolicyError(f"{required}: required")
    values = {key: _FIELDS[key](key, value) for key, value in data.items()}
    return Policy(**values)


def load_policy(path: str, *, check_owner: bool = True) -> Policy:
    """Read, check ownership of, and parse the policy file. Raises `PolicyError`."""
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
