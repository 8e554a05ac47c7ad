"""The configuration's vocabulary: known keys, limits local to the file, patterns.

Everything not defined here is shared with the helper and the workers: limits
in ipc.constants, name and fingerprint patterns in ipc.types, the engine and
event-loop names in ipc.control_messages (`Engine`, `EventLoop`).
"""

from __future__ import annotations

import re
from typing import Final

from l3ptp.ipc.constants import KILL_SWITCH_METRIC, MTU_DEFAULT, WORKER_STATUS_TIMEOUT
from l3ptp.ipc.control_messages import Engine, EventLoop, UnderlayPorts
from l3ptp.ipc.types import FINGERPRINT_PATTERN, NETWORK_NAME_PATTERN, NODE_ID_PATTERN, PeerRole

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

# The accepted values are the ipc enums' (plain strings, in the enums' order,
# so error messages list them as 'auto', 'aioquic', ...).
ROLES: Final[tuple[str, ...]] = tuple(r.value for r in PeerRole)
#: QUIC engines a worker can use: "auto" takes qh3 when installed, else aioquic.
ENGINES: Final[tuple[str, ...]] = tuple(e.value for e in Engine)
#: Worker event loops: "auto" is asyncio (uvloop did not measure faster, docs/performance.md).
EVENT_LOOPS: Final[tuple[str, ...]] = tuple(e.value for e in EventLoop)
#: TUN offloads of a network: "auto" creates its device with IFF_VNET_HDR (the workers split and coalesce where
#: the kernel allows), "gro" (the default) too but its workers only coalesce what they write (the kernel
#: segments what it sends them), "off" without (docs/worker.md, docs/performance.md).
OFFLOADS: Final[tuple[str, ...]] = ("auto", "gro", "off")
#: The default `offload`: measured the fastest for TCP, to the host and routed on, at no cost to UDP
#: (docs/performance.md, "TUN offloads").
OFFLOAD_DEFAULT: Final = "gro"
#: Highest CPU number accepted in `cpus`.
CPU_MAX: Final = 4095
NODE_ID_RE: Final = re.compile(NODE_ID_PATTERN)
NETWORK_NAME_RE: Final = re.compile(NETWORK_NAME_PATTERN)
#: POSIX-style user or group name; the same pattern the worker config accepts.
ACCOUNT_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_-]{0,63}\$?")
FINGERPRINT_RE: Final = re.compile(FINGERPRINT_PATTERN)

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
    "offload",
    "cpus",
    "peer_key",
    "peer_keys",
    "key_file",
    "underlay",
    "reality",
)
UNDERLAY_KEYS: Final = ("local", "peer", "port", "ports")
#: `underlay.ports`: "shared" (one UDP port per network, the default) or "per-queue" (port + queue).
PORT_MODES: Final[tuple[str, ...]] = tuple(p.value for p in UnderlayPorts)
PREFIX_LISTS: Final = ("advertised_routes", "accepted_routes", "allowed_sources")
