"""The configuration's vocabulary: known keys, limits local to the file, patterns.

Everything not defined here is ipc.constants (limits shared with the helper
and the workers).
"""

from __future__ import annotations

import re
from typing import Final

from l3ptp.controller.config.model import Role
from l3ptp.ipc.constants import (
    KILL_SWITCH_METRIC,
    MTU_DEFAULT,
    NETWORK_NAME_MAX,
    NODE_ID_MAX,
    WORKER_STATUS_TIMEOUT,
)


#: Controller status interval bounds (seconds).
STATUS_INTERVAL_MIN: Final = 0.1
STATUS_INTERVAL_MAX: Final = WORKER_STATUS_TIMEOUT / 4  # a worker silent WORKER_STATUS_TIMEOUT is dead
#: Highest UDP/TCP port number.
PORT_MAX: Final = 0xFFFF
#: Route metrics are unsigned 32-bit; the highest is the helper's kill switch.
ROUTE_METRIC_MAX: Final = KILL_SWITCH_METRIC - 1
#: IPv6 minimum link MTU (RFC 8200, section 5). The tunnel MTU default is
#: defined as exactly this value (see ipc.constants); Linux refuses IPv6
#: addresses on a link with a smaller MTU.
IPV6_MIN_MTU: Final = MTU_DEFAULT
#: A peer key fingerprint is "SHA256:" + unpadded base64 of a SHA-256 digest.
FINGERPRINT_PREFIX: Final = "SHA256:"
FINGERPRINT_DIGEST_LEN: Final = 32
FINGERPRINT_CHARS: Final = (FINGERPRINT_DIGEST_LEN * 4 + 2) // 3

ROLES: Final[tuple[Role, ...]] = ("listen", "connect")
#: QUIC engines a worker can use: "auto" takes qh3 when installed, else aioquic.
ENGINES: Final[tuple[str, ...]] = ("auto", "aioquic", "qh3")
#: Worker event loops: "auto" is asyncio (uvloop measured slower, docs/performance.md).
EVENT_LOOPS: Final[tuple[str, ...]] = ("auto", "asyncio", "uvloop")
#: Highest CPU number accepted in `cpus`.
CPU_MAX: Final = 4095
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,%d}" % NODE_ID_MAX)
NETWORK_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,%d}" % (NETWORK_NAME_MAX - 1))
#: POSIX-style user or group name; the same pattern the worker config accepts.
ACCOUNT_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_-]{0,63}\$?")
FINGERPRINT_RE: Final = re.compile(re.escape(FINGERPRINT_PREFIX) + r"([A-Za-z0-9+/]{%d})" % FINGERPRINT_CHARS)

TOP_KEYS: Final = ("node", "controller", "metrics", "networks")
NODE_KEYS: Final = ("id", "key_file")
CONTROLLER_KEYS: Final = (
    "runtime_dir",
    "helper_socket",
    "interface_prefix",
    "worker_user",
    "status_interval",
    "admin_group",
    "polkit",
)
METRICS_KEYS: Final = ("enabled", "address", "port")
NETWORK_KEYS: Final = (
    "enabled",
    "interface",
    "role",
    "mtu",
    "max_datagram_size",
    "queues",
    "local_ipv4",
    "peer_ipv4",
    "local_ipv6",
    "peer_ipv6",
    "advertised_routes",
    "accepted_routes",
    "allowed_sources",
    "install_routes",
    "allow_default_route",
    "allow_overlap",
    "route_metric",
    "keepalive_interval",
    "engine",
    "event_loop",
    "cpus",
    "peer_key",
    "key_file",
    "underlay",
)
UNDERLAY_KEYS: Final = ("local", "peer", "port")
PREFIX_LISTS: Final = ("advertised_routes", "accepted_routes", "allowed_sources")
