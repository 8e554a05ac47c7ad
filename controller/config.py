"""Controller configuration: one TOML file, parsed and validated in full.

Contract
--------
* `load_config` reads one file with `tomllib`; `parse_config` validates the
  decoded document. Both return an immutable `Config` or raise `ConfigError`.
  Nothing else escapes: an unreadable file, a TOML syntax error and every
  schema or policy violation become a `ConfigError`.
* Validation never stops at the first problem. `ConfigError.errors` holds
  every error found, each starting with the key path it is about, for example
  ``networks.office.mtu: 70000 is outside 576..9000``.
* The result is made of frozen, slotted dataclasses that compare and hash by
  value, so a reload can diff old and new networks with ``==``. Lists become
  tuples; addresses and prefixes become `ipaddress` objects.
* This module is pure: it reads the one file it is given and nothing else
  (key files, users and groups are not looked up; sockets are not bound).

docs/configuration.md documents every key and rule; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, TypeVar

from l3ptp.ipc.constants import (
    HEADER_LEN,
    HELPER_SOCKET_DEFAULT,
    IFNAME_ALLOWED,
    IFNAME_MAX,
    IFNAME_PREFIX_DEFAULT,
    KEEPALIVE_INTERVAL_DEFAULT,
    KEEPALIVE_INTERVAL_MAX,
    KEEPALIVE_INTERVAL_MIN,
    KILL_SWITCH_METRIC,
    MAX_DATAGRAM_SIZE_DEFAULT,
    MAX_DATAGRAM_SIZE_MAX,
    MAX_DATAGRAM_SIZE_MIN,
    MAX_NETWORKS,
    MAX_PREFIXES_PER_LIST,
    MAX_QUEUES,
    METRICS_ADDRESS_DEFAULT,
    METRICS_PORT_DEFAULT,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    NETWORK_NAME_MAX,
    NODE_ID_MAX,
    QUIC_DATAGRAM_OVERHEAD_MAX,
    ROUTE_METRIC_DEFAULT,
    WORKER_STATUS_TIMEOUT,
    RUNTIME_DIR_DEFAULT,
    STATUS_INTERVAL,
    datagram_budget,
)

__all__ = [
    "Config",
    "ConfigError",
    "ControllerConfig",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "MetricsConfig",
    "NetworkConfig",
    "NodeConfig",
    "Role",
    "UnderlayConfig",
    "load_config",
    "parse_config",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Which side of the QUIC connection a network plays (values of ipc PeerRole).
Role: TypeAlias = Literal["listen", "connect"]

# --------------------------------------------------------------------------
# Limits local to the configuration file (everything else is ipc.constants)
# --------------------------------------------------------------------------

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
_FINGERPRINT_CHARS: Final = (FINGERPRINT_DIGEST_LEN * 4 + 2) // 3

_ROLES: Final[tuple[Role, ...]] = ("listen", "connect")
#: QUIC engines a worker can use: "auto" takes qh3 when installed, else aioquic.
ENGINES: Final[tuple[str, ...]] = ("auto", "aioquic", "qh3")
#: Worker event loops: "auto" is asyncio (uvloop measured slower, docs/performance.md).
EVENT_LOOPS: Final[tuple[str, ...]] = ("auto", "asyncio", "uvloop")
#: Highest CPU number accepted in `cpus`.
CPU_MAX: Final = 4095
_NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,%d}" % NODE_ID_MAX)
_NETWORK_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,%d}" % (NETWORK_NAME_MAX - 1))
#: POSIX-style user or group name; the same pattern the worker config accepts.
_ACCOUNT_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_-]{0,63}\$?")
_FINGERPRINT_RE: Final = re.compile(re.escape(FINGERPRINT_PREFIX) + r"([A-Za-z0-9+/]{%d})" % _FINGERPRINT_CHARS)
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
#: How errors about the document itself (not one of its keys) are labelled.
_ROOT: Final = "(top level)"

_TOP_KEYS: Final = ("node", "controller", "metrics", "networks")
_NODE_KEYS: Final = ("id", "key_file")
_CONTROLLER_KEYS: Final = (
    "runtime_dir",
    "helper_socket",
    "interface_prefix",
    "worker_user",
    "status_interval",
    "admin_group",
    "polkit",
)
_METRICS_KEYS: Final = ("enabled", "address", "port")
_NETWORK_KEYS: Final = (
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
_UNDERLAY_KEYS: Final = ("local", "peer", "port")
_PREFIX_LISTS: Final = ("advertised_routes", "accepted_routes", "allowed_sources")

# --------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration could not be read or is invalid.

    `errors` lists every problem found (never just the first), each starting
    with the key path it concerns; `source` names the file (or ``<config>``).
    ``str()`` gives one line per error, ``"<source>: <error>"``.
    """

    def __init__(self, errors: Iterable[str], source: str = "<config>") -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        self.source = source
        super().__init__(self.errors, source)

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {error}" for error in self.errors)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    """``[node]``: this node's identity."""

    id: str
    #: Absolute path of this node's private key (not checked for existence).
    key_file: str


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``[controller]``: local process settings. Field defaults are the schema's."""

    runtime_dir: str = RUNTIME_DIR_DEFAULT
    helper_socket: str = HELPER_SOCKET_DEFAULT
    interface_prefix: str = IFNAME_PREFIX_DEFAULT
    #: User a worker switches to when started as root; "" = none.
    worker_user: str = ""
    status_interval: float = STATUS_INTERVAL
    #: Group allowed to use the CLI socket; "" = none.
    admin_group: str = ""
    #: Authorise each CLI caller (root, own uid, admin_group, else polkit);
    #: control.sock is then 0666 instead of 0660 (controller/polkit.py).
    polkit: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint. Field defaults are the schema's."""

    enabled: bool = True
    address: IPAddress = ipaddress.ip_address(METRICS_ADDRESS_DEFAULT)
    port: int = METRICS_PORT_DEFAULT


@dataclasses.dataclass(frozen=True, slots=True)
class UnderlayConfig:
    """``[networks.<name>.underlay]``: the UDP path the QUIC connections use.

    `local` is the bind address (listen) or optional source address (connect);
    `peer` is the address to connect to (connect) or an optional filter
    (listen). Queue k uses UDP port ``port + k``.
    """

    local: IPAddress | None
    peer: IPAddress | None
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkConfig:
    """``[networks.<name>]``: one point-to-point tunnel, fully validated.

    Invariants guaranteed by `parse_config`: at least one address family;
    every local tunnel address has a peer address of the same family, in the
    same subnet, with the same prefix length; `mtu` fits the DATAGRAM budget
    of `max_datagram_size`; every prefix is strict; every port of
    ``underlay.port .. underlay.port + queues - 1`` is valid.
    """

    name: str
    enabled: bool
    interface: str
    role: Role
    mtu: int
    max_datagram_size: int
    queues: int
    local_ipv4: ipaddress.IPv4Interface | None
    peer_ipv4: ipaddress.IPv4Interface | None
    local_ipv6: ipaddress.IPv6Interface | None
    peer_ipv6: ipaddress.IPv6Interface | None
    #: Prefixes we advertise to the peer (and may send from).
    advertised_routes: tuple[IPNetwork, ...]
    #: Routes to install: a peer-advertised route is installed only inside one of these.
    accepted_routes: tuple[IPNetwork, ...]
    #: Extra source prefixes accepted from the peer.
    allowed_sources: tuple[IPNetwork, ...]
    install_routes: bool
    allow_default_route: bool
    allow_overlap: bool
    route_metric: int
    keepalive_interval: float
    #: QUIC engine of the workers: one of `ENGINES`.
    engine: str
    #: Event loop of the workers: one of `EVENT_LOOPS`.
    event_loop: str
    #: CPUs to pin workers to: queue k runs on cpus[k % len(cpus)]; () = no pinning.
    cpus: tuple[int, ...]
    #: Pinned peer key fingerprint, "SHA256:" + 43 characters of base64.
    peer_key: str
    #: Per-network private key override; "" = use the node's key_file.
    key_file: str
    underlay: UnderlayConfig

    def addresses(self) -> tuple[IPInterface, ...]:
        """Local tunnel addresses (with prefix length), IPv4 first, then IPv6."""
        return tuple(a for a in (self.local_ipv4, self.local_ipv6) if a is not None)

    def peer_addresses(self) -> tuple[IPInterface, ...]:
        """The peer's tunnel addresses (with prefix length), IPv4 first, then IPv6."""
        return tuple(a for a in (self.peer_ipv4, self.peer_ipv6) if a is not None)

    def local_sources(self) -> tuple[IPNetwork, ...]:
        """Source prefixes allowed on packets read from our TUN device.

        The local tunnel addresses as host prefixes (/32, /128) followed by
        `advertised_routes`, without duplicates, in that order.
        """
        return _unique([*(_host_prefix(a) for a in self.addresses()), *self.advertised_routes])

    def peer_sources(self) -> tuple[IPNetwork, ...]:
        """Source prefixes accepted on packets from the peer (like WireGuard AllowedIPs).

        The peer's tunnel addresses as host prefixes, then `accepted_routes`,
        then `allowed_sources`, without duplicates, in that order.
        """
        hosts = (_host_prefix(a) for a in self.peer_addresses())
        return _unique([*hosts, *self.accepted_routes, *self.allowed_sources])

    def key_path(self, node: NodeConfig) -> str:
        """Private key file for this network: its own `key_file`, else the node's."""
        return self.key_file or node.key_file

    def queue_port(self, queue: int) -> int:
        """UDP port of queue `queue` (0-based); ValueError outside ``0..queues-1``."""
        if isinstance(queue, bool) or not isinstance(queue, int) or not 0 <= queue < self.queues:
            raise ValueError(f"queue {queue!r} is outside 0..{self.queues - 1}")
        return self.underlay.port + queue


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration file. `networks` keeps the file's order."""

    node: NodeConfig
    controller: ControllerConfig = ControllerConfig()
    metrics: MetricsConfig = MetricsConfig()
    networks: tuple[NetworkConfig, ...] = ()

    def network(self, name: str) -> NetworkConfig | None:
        """The network called `name`, or None."""
        for net in self.networks:
            if net.name == name:
                return net
        return None


def _host_prefix(iface: IPInterface) -> IPNetwork:
    return ipaddress.ip_network(iface.ip)


_T = TypeVar("_T")


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at `path`.

    Raises `ConfigError` (with `source` set to the path) when the file cannot
    be read, is not UTF-8, is not valid TOML, or does not validate.
    """
    source = os.fsdecode(path)
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"cannot read configuration file: {exc.strerror or exc}"], source) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"configuration file is not valid UTF-8: {exc.reason} at byte {exc.start}"], source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], source) from exc
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate a decoded TOML document (as `tomllib` returns it).

    Returns the `Config`, or raises one `ConfigError` listing every error.
    `source` only labels the error.
    """
    col = _Collector()
    top = col.table(data, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(col.errors, source)

    node = _parse_node(col, top)
    controller = _parse_controller(col, top)
    metrics = _parse_metrics(col, top)
    prefix = controller["interface_prefix"] if controller is not None else _BAD
    drafts = _parse_networks(col, top, prefix)
    _check_across_networks(col, drafts)

    if col.errors:
        raise ConfigError(col.errors, source)
    assert node is not None and controller is not None and metrics is not None
    return Config(
        node=NodeConfig(**node),
        controller=ControllerConfig(**controller),
        metrics=MetricsConfig(**metrics),
        networks=tuple(d.build() for d in drafts),
    )


# --------------------------------------------------------------------------
# Error collection and typed field readers
# --------------------------------------------------------------------------


class _Bad:
    """Marker for a value that failed validation (its error is recorded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<invalid>"


_BAD: Final = _Bad()
_REQUIRED: Final = object()

_Converter: TypeAlias = Callable[[Any, str, "_Collector"], Any]


def _describe(value: object) -> str:
    """TOML type name of a decoded value, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a value of type {type(value).__name__}"


def _join(path: str, key: str) -> str:
    """Dotted key path, quoting keys that are not TOML bare keys."""
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


class _Collector:
    """Collects errors; every reader records its error and returns `_BAD`."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(f"{path or _ROOT}: {message}")

    def type_error(self, path: str, expected: str, value: object) -> _Bad:
        self.add(path, f"expected {expected}, got {_describe(value)}")
        return _BAD

    def table(self, value: object, path: str, known: Sequence[str]) -> Mapping[str, Any] | None:
        """Check that `value` is a table and report each key not in `known`."""
        if not isinstance(value, Mapping):
            self.type_error(path, "a table", value)
            return None
        for key in value:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.add(path, f"unknown key {key!r}{hint}")
        return value

    def field(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        convert: _Converter,
        default: Any = _REQUIRED,
    ) -> Any:
        """Converted value of `key`, `default` when absent, or `_BAD` on error."""
        if key not in table:
            if default is _REQUIRED:
                self.add(_join(path, key), "required")
                return _BAD
            return default
        return convert(table[key], _join(path, key), self)


def _ok(*values: object) -> bool:
    """True when none of `values` failed validation."""
    return not any(v is _BAD for v in values)


def _integer(lo: int, hi: int) -> _Converter:
    def convert(value: Any, path: str, col: _Collector) -> int | _Bad:
        if isinstance(value, bool) or not isinstance(value, int):
            return col.type_error(path, "an integer", value)
        if not lo <= value <= hi:
            col.add(path, f"{value} is outside {lo}..{hi}")
            return _BAD
        return value

    return convert


def _number(lo: float, hi: float) -> _Converter:
    """A float or integer (seconds), returned as float."""

    def convert(value: Any, path: str, col: _Collector) -> float | _Bad:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return col.type_error(path, "a number", value)
        if not math.isfinite(value) or not lo <= value <= hi:
            col.add(path, f"{value} is outside {lo:g}..{hi:g}")
            return _BAD
        return float(value)

    return convert


def _boolean(value: Any, path: str, col: _Collector) -> bool | _Bad:
    if not isinstance(value, bool):
        return col.type_error(path, "a boolean", value)
    return value


def _choice(choices: tuple[str, ...]) -> _Converter:
    def convert(value: Any, path: str, col: _Collector) -> str | _Bad:
        if not isinstance(value, str):
            return col.type_error(path, "a string", value)
        if value not in choices:
            col.add(path, f"{value!r} is not one of " + ", ".join(repr(c) for c in choices))
            return _BAD
        return value

    return convert


def _cpu_list(value: Any, path: str, col: _Collector) -> tuple[int, ...] | _Bad:
    if not isinstance(value, list):
        return col.type_error(path, "a list of CPU numbers", value)
    if len(value) > MAX_QUEUES:
        col.add(path, f"at most {MAX_QUEUES} CPUs")
        return _BAD
    out = []
    for i, cpu in enumerate(value):
        if isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu <= CPU_MAX:
            col.add(f"{path}[{i}]", f"expected a CPU number 0..{CPU_MAX}, got {cpu!r}")
            return _BAD
        out.append(cpu)
    return tuple(out)


def _node_id(value: Any, path: str, col: _Collector) -> str | _Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not _NODE_ID_RE.fullmatch(value):
        col.add(path, f"{value!r} must be 1..{NODE_ID_MAX} characters of [A-Za-z0-9._-]")
        return _BAD
    return value


def _absolute_path(value: Any, path: str, col: _Collector) -> str | _Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not value:
        col.add(path, "must not be empty")
        return _BAD
    if "\0" in value:
        col.add(path, "must not contain a NUL character")
        return _BAD
    if not value.startswith("/"):
        col.add(path, f"{value!r} is not an absolute path")
        return _BAD
    return value


def _optional_path(value: Any, path: str, col: _Collector) -> str | _Bad:
    """An absolute path, or "" for none."""
    if value == "":
        return ""
    return _absolute_path(value, path, col)


def _account_name(value: Any, path: str, col: _Collector) -> str | _Bad:
    """A user or group name, or "" for none."""
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if value and not _ACCOUNT_NAME_RE.fullmatch(value):
        col.add(path, f"{value!r} is not a valid user or group name ([a-z_][a-z0-9_-]*, at most 64 characters)")
        return _BAD
    return value


def _interface_prefix(value: Any, path: str, col: _Collector) -> str | _Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not 1 <= len(value) <= IFNAME_MAX - 1 or any(c not in IFNAME_ALLOWED for c in value) or value[0] == "-":
        col.add(
            path,
            f"{value!r} must be 1..{IFNAME_MAX - 1} characters of [a-z0-9-], not starting with '-'",
        )
        return _BAD
    return value


def _interface_problems(name: str, prefix: str | None) -> list[str]:
    """Why `name` is not a valid interface name with `prefix` (None: unknown)."""
    problems = []
    if not name:
        problems.append("must not be empty")
    elif any(c not in IFNAME_ALLOWED for c in name):
        problems.append("must use only the characters a-z, 0-9 and '-'")
    if len(name.encode()) > IFNAME_MAX:
        problems.append(f"is {len(name.encode())} bytes long, at most {IFNAME_MAX} allowed")
    if prefix is not None and (not name.startswith(prefix) or len(name) <= len(prefix)):
        problems.append(f"must start with interface_prefix {prefix!r} and be longer than it")
    return problems


def _ip_address(value: Any, path: str, col: _Collector) -> IPAddress | _Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        col.add(path, f"{value!r} is not a valid IP address")
        return _BAD


_EXAMPLE_INTERFACE: Final = {4: "198.19.0.1/24", 6: "fd00:19::1/64"}


def _tunnel_address(version: int) -> _Converter:
    """An IPv4Interface or IPv6Interface (address with prefix length) of `version`."""

    def convert(value: Any, path: str, col: _Collector) -> IPInterface | _Bad:
        if not isinstance(value, str):
            return col.type_error(path, "a string", value)
        if "/" not in value:
            col.add(path, f"{value!r} needs a prefix length, like {_EXAMPLE_INTERFACE[version]}")
            return _BAD
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            col.add(path, f"{value!r} is not a valid IPv{version} address with prefix length")
            return _BAD
        if iface.version != version:
            col.add(path, f"{value} is an IPv{iface.version} address, expected IPv{version}")
            return _BAD
        ip, net = iface.ip, iface.network
        for special in ("unspecified", "loopback", "multicast"):
            if getattr(ip, f"is_{special}"):
                col.add(path, f"{ip} is a {special} address")
                return _BAD
        if ip.max_prefixlen - net.prefixlen >= 2:  # /31, /32, /127, /128 have no special host
            if ip == net.network_address:
                col.add(path, f"{iface} is the subnet's own address; use a host address of {net}")
                return _BAD
            if version == 4 and ip == net.broadcast_address:
                col.add(path, f"{iface} is the broadcast address of {net}")
                return _BAD
        return iface

    return convert


def _prefix(value: Any, path: str, col: _Collector) -> IPNetwork | _Bad:
    """A strict prefix (no host bits set)."""
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        col.add(path, f"{value!r} is not a valid IP prefix")
        return _BAD
    col.add(path, f"{value} has host bits set (did you mean {loose}?)")
    return _BAD


def _prefix_list(value: Any, path: str, col: _Collector) -> tuple[IPNetwork | None, ...] | _Bad:
    """Strict prefixes, no duplicates. An invalid entry is kept as None."""
    if not isinstance(value, list):
        return col.type_error(path, "an array", value)
    if len(value) > MAX_PREFIXES_PER_LIST:
        col.add(path, f"has {len(value)} entries, at most {MAX_PREFIXES_PER_LIST} allowed")
        return _BAD
    out: list[IPNetwork | None] = []
    seen: dict[IPNetwork, int] = {}
    for i, item in enumerate(value):
        net = _prefix(item, f"{path}[{i}]", col)
        if isinstance(net, _Bad):
            out.append(None)
        elif net in seen:
            col.add(f"{path}[{i}]", f"{net} duplicates {path}[{seen[net]}]")
            out.append(None)
        else:
            seen[net] = i
            out.append(net)
    return tuple(out)


def _peer_key(value: Any, path: str, col: _Collector) -> str | _Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    match = _FINGERPRINT_RE.fullmatch(value)
    if match is None:
        col.add(
            path,
            f"must be {FINGERPRINT_PREFIX!r} followed by {_FINGERPRINT_CHARS} characters of unpadded"
            f" standard base64 (a {FINGERPRINT_DIGEST_LEN}-byte digest)",
        )
        return _BAD
    encoded = match[1]
    try:
        digest = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:  # pragma: no cover - the pattern admits only valid base64
        digest = b""
    if len(digest) != FINGERPRINT_DIGEST_LEN or base64.b64encode(digest).decode().rstrip("=") != encoded:
        col.add(path, f"is not the canonical base64 of a {FINGERPRINT_DIGEST_LEN}-byte digest")
        return _BAD
    return value


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _parse_node(col: _Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    if "node" not in top:
        col.add("node", "required")
        return None
    tbl = col.table(top["node"], "node", _NODE_KEYS)
    if tbl is None:
        return None
    values = {
        "id": col.field(tbl, "node", "id", _node_id),
        "key_file": col.field(tbl, "node", "key_file", _absolute_path),
    }
    return values if _ok(*values.values()) else None


def _parse_controller(col: _Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    """Controller settings; None if the table is not a table. Fields may be `_BAD`."""
    tbl = col.table(top.get("controller", {}), "controller", _CONTROLLER_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: _Converter, default: Any) -> Any:
        return col.field(tbl, "controller", key, convert, default)

    return {
        "runtime_dir": f("runtime_dir", _absolute_path, RUNTIME_DIR_DEFAULT),
        "helper_socket": f("helper_socket", _absolute_path, HELPER_SOCKET_DEFAULT),
        "interface_prefix": f("interface_prefix", _interface_prefix, IFNAME_PREFIX_DEFAULT),
        "worker_user": f("worker_user", _account_name, ""),
        "status_interval": f("status_interval", _number(STATUS_INTERVAL_MIN, STATUS_INTERVAL_MAX), STATUS_INTERVAL),
        "admin_group": f("admin_group", _account_name, ""),
        "polkit": f("polkit", _boolean, False),
    }


def _parse_metrics(col: _Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    tbl = col.table(top.get("metrics", {}), "metrics", _METRICS_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: _Converter, default: Any) -> Any:
        return col.field(tbl, "metrics", key, convert, default)

    return {
        "enabled": f("enabled", _boolean, True),
        "address": f("address", _ip_address, ipaddress.ip_address(METRICS_ADDRESS_DEFAULT)),
        "port": f("port", _integer(1, PORT_MAX), METRICS_PORT_DEFAULT),
    }


@dataclasses.dataclass(slots=True)
class _Draft:
    """One network as read: field values (possibly `_BAD`) plus where they came from."""

    name: str
    path: str
    present: frozenset[str]
    values: dict[str, Any]
    underlay: dict[str, Any] | None

    def get(self, key: str) -> Any:
        return self.values.get(key, _BAD)

    def key(self, key: str) -> str:
        return _join(self.path, key)

    def build(self) -> NetworkConfig:
        """The NetworkConfig; only called when no error was recorded."""
        assert self.underlay is not None and _ok(*self.values.values(), *self.underlay.values())
        values = dict(self.values)
        for key in _PREFIX_LISTS:
            assert None not in values[key]
        return NetworkConfig(name=self.name, underlay=UnderlayConfig(**self.underlay), **values)


def _parse_networks(col: _Collector, top: Mapping[str, Any], prefix: Any) -> list[_Draft]:
    raw = top.get("networks", {})
    if not isinstance(raw, Mapping):
        col.type_error("networks", "a table", raw)
        return []
    if len(raw) > MAX_NETWORKS:
        col.add("networks", f"{len(raw)} networks configured, at most {MAX_NETWORKS} allowed")
    drafts = []
    for name, body in raw.items():
        if not isinstance(name, str):  # only possible for documents not made by tomllib
            col.add("networks", f"network name {name!r} is not a string")
            continue
        draft = _parse_network(col, name, body, _join("networks", name), prefix)
        if draft is not None:
            drafts.append(draft)
    return drafts


def _parse_network(col: _Collector, name: str, body: Any, path: str, prefix: Any) -> _Draft | None:
    name_ok = bool(_NETWORK_NAME_RE.fullmatch(name))
    if not name_ok:
        col.add(
            path,
            f"invalid network name {name!r}: must be 1..{NETWORK_NAME_MAX} characters of"
            " [a-z0-9_-], starting with a letter or digit",
        )
    tbl = col.table(body, path, _NETWORK_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: _Converter, default: Any = _REQUIRED) -> Any:
        return col.field(tbl, path, key, convert, default)

    v: dict[str, Any] = {}
    v["enabled"] = f("enabled", _boolean, True)
    v["interface"] = _network_interface(col, tbl, path, name if name_ok else None, prefix)
    v["role"] = f("role", _choice(_ROLES))
    v["mtu"] = f("mtu", _integer(MTU_MIN, MTU_MAX), MTU_DEFAULT)
    v["max_datagram_size"] = f(
        "max_datagram_size", _integer(MAX_DATAGRAM_SIZE_MIN, MAX_DATAGRAM_SIZE_MAX), MAX_DATAGRAM_SIZE_DEFAULT
    )
    v["queues"] = f("queues", _integer(1, MAX_QUEUES), 1)
    for version in (4, 6):
        for side in ("local", "peer"):
            v[f"{side}_ipv{version}"] = f(f"{side}_ipv{version}", _tunnel_address(version), None)
    for key in _PREFIX_LISTS:
        v[key] = f(key, _prefix_list, ())
    v["install_routes"] = f("install_routes", _boolean, True)
    v["allow_default_route"] = f("allow_default_route", _boolean, False)
    v["allow_overlap"] = f("allow_overlap", _boolean, False)
    v["route_metric"] = f("route_metric", _integer(0, ROUTE_METRIC_MAX), ROUTE_METRIC_DEFAULT)
    v["keepalive_interval"] = f(
        "keepalive_interval",
        _number(KEEPALIVE_INTERVAL_MIN, KEEPALIVE_INTERVAL_MAX),
        KEEPALIVE_INTERVAL_DEFAULT,
    )
    v["engine"] = f("engine", _choice(ENGINES), "auto")
    v["event_loop"] = f("event_loop", _choice(EVENT_LOOPS), "auto")
    v["cpus"] = f("cpus", _cpu_list, ())
    v["peer_key"] = f("peer_key", _peer_key)
    v["key_file"] = f("key_file", _optional_path, "")

    draft = _Draft(name=name, path=path, present=frozenset(tbl), values=v, underlay=None)
    draft.underlay = _parse_underlay(col, tbl, draft)
    _check_addresses(col, draft)
    _check_mtu(col, draft)
    _check_prefixes(col, draft)
    return draft


def _network_interface(
    col: _Collector, tbl: Mapping[str, Any], path: str, name: str | None, prefix: Any
) -> str | _Bad:
    """The interface name, explicit or derived as interface_prefix + name."""
    ipath = _join(path, "interface")
    known_prefix = prefix if isinstance(prefix, str) else None
    if "interface" in tbl:
        value = tbl["interface"]
        if not isinstance(value, str):
            return col.type_error(ipath, "a string", value)
        problems = _interface_problems(value, known_prefix)
        if problems:
            col.add(ipath, f"{value!r} " + "; ".join(problems))
            return _BAD
        return value
    if name is None or known_prefix is None:
        return _BAD  # the cause is reported already
    derived = known_prefix + name
    problems = _interface_problems(derived, known_prefix)
    if problems:
        col.add(
            ipath,
            f"the default name {derived!r} (interface_prefix + network name) "
            + "; ".join(problems)
            + "; set interface explicitly",
        )
        return _BAD
    return derived


def _parse_underlay(col: _Collector, tbl: Mapping[str, Any], draft: _Draft) -> dict[str, Any] | None:
    path = draft.key("underlay")
    if "underlay" not in tbl:
        col.add(path, "required")
        return None
    utbl = col.table(tbl["underlay"], path, _UNDERLAY_KEYS)
    if utbl is None:
        return None
    local = col.field(utbl, path, "local", _ip_address, None)
    peer = col.field(utbl, path, "peer", _ip_address, None)
    port = col.field(utbl, path, "port", _integer(1, PORT_MAX))
    role, queues = draft.get("role"), draft.get("queues")
    lpath, ppath = _join(path, "local"), _join(path, "peer")

    if role == "listen" and local is None:
        col.add(lpath, "required for role 'listen' (the address to bind; 0.0.0.0 or :: for all)")
    if role == "connect" and peer is None:
        col.add(ppath, "required for role 'connect' (the address to connect to)")
    if isinstance(local, _ADDRESS_TYPES) and local.is_multicast:
        col.add(lpath, f"{local} is a multicast address")
    if isinstance(peer, _ADDRESS_TYPES) and (peer.is_unspecified or peer.is_multicast):
        col.add(ppath, f"{peer} is not a unicast address")
    if isinstance(local, _ADDRESS_TYPES) and isinstance(peer, _ADDRESS_TYPES) and local.version != peer.version:
        col.add(ppath, f"{peer} is IPv{peer.version} but underlay.local {local} is IPv{local.version}")
    if isinstance(port, int) and isinstance(queues, int) and port + queues - 1 > PORT_MAX:
        col.add(
            _join(path, "port"),
            f"{port} with {queues} queues needs ports up to {port + queues - 1}, above {PORT_MAX}",
        )
    return {"local": local, "peer": peer, "port": port}


_ADDRESS_TYPES: Final = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_INTERFACE_TYPES: Final = (ipaddress.IPv4Interface, ipaddress.IPv6Interface)


def _check_addresses(col: _Collector, draft: _Draft) -> None:
    """Tunnel addresses: at least one family; each local has a matching peer."""
    keys = [f"{side}_ipv{version}" for version in (4, 6) for side in ("local", "peer")]
    if not any(k in draft.present for k in keys):
        col.add(draft.path, "at least one of local_ipv4, local_ipv6 is required")
        return
    for version in (4, 6):
        lkey, pkey = f"local_ipv{version}", f"peer_ipv{version}"
        if lkey in draft.present and pkey not in draft.present:
            col.add(draft.key(pkey), f"missing peer settings: required because {lkey} is set")
        if pkey in draft.present and lkey not in draft.present:
            col.add(draft.key(lkey), f"missing local settings: required because {pkey} is set")
        local, peer = draft.get(lkey), draft.get(pkey)
        if not (isinstance(local, _INTERFACE_TYPES) and isinstance(peer, _INTERFACE_TYPES)):
            continue
        ppath = draft.key(pkey)
        if peer.network.prefixlen != local.network.prefixlen:
            col.add(ppath, f"prefix length /{peer.network.prefixlen} differs from {lkey}'s /{local.network.prefixlen}")
        if peer.ip == local.ip:
            col.add(ppath, f"{peer.ip} is the same address as {lkey}")
        elif peer.ip not in local.network:
            col.add(ppath, f"{peer.ip} is outside {lkey}'s subnet {local.network}")


def _check_mtu(col: _Collector, draft: _Draft) -> None:
    mtu, mds = draft.get("mtu"), draft.get("max_datagram_size")
    if not _ok(mtu):
        return
    if _ok(mds):
        budget = datagram_budget(mds)
        if mtu > budget:
            col.add(
                draft.key("mtu"),
                f"{mtu} exceeds the DATAGRAM budget {budget} of max_datagram_size {mds}"
                f" ({mds} - {QUIC_DATAGRAM_OVERHEAD_MAX} bytes QUIC overhead - {HEADER_LEN} bytes header);"
                f" raise max_datagram_size to at least {mtu + mds - budget} or lower mtu",
            )
    if "local_ipv6" in draft.present and mtu < IPV6_MIN_MTU:
        col.add(
            draft.key("mtu"),
            f"{mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum link MTU; required because local_ipv6 is set",
        )


def _check_prefixes(col: _Collector, draft: _Draft) -> None:
    """Families of listed prefixes, the default-route opt-in, derived list sizes."""
    families: dict[int, bool | None] = {}  # version -> has a tunnel address (None: unknown)
    for version in (4, 6):
        local = draft.get(f"local_ipv{version}")
        families[version] = None if local is _BAD else local is not None
    allow_default = draft.get("allow_default_route")
    for key in _PREFIX_LISTS:
        items = draft.get(key)
        if not _ok(items):
            continue
        for i, net in enumerate(items):
            if net is None:
                continue
            ipath = f"{draft.key(key)}[{i}]"
            if families[net.version] is False:
                col.add(
                    ipath,
                    f"{net} is an IPv{net.version} prefix but the network has no IPv{net.version}"
                    f" tunnel address (local_ipv{net.version})",
                )
            if key == "accepted_routes" and net.prefixlen == 0 and allow_default is False:
                col.add(ipath, f"{net} is a default route; set allow_default_route = true to accept it")

    derived = {
        "local_sources": (("local_ipv4", "local_ipv6"), ("advertised_routes",)),
        "peer_sources": (("peer_ipv4", "peer_ipv6"), ("accepted_routes", "allowed_sources")),
    }
    for label, (address_keys, list_keys) in derived.items():
        parts = [draft.get(k) for k in (*address_keys, *list_keys)]
        if not _ok(*parts):
            continue
        prefixes = [_host_prefix(a) for a in parts[: len(address_keys)] if a is not None]
        for items in parts[len(address_keys) :]:
            prefixes.extend(n for n in items if n is not None)
        count = len(set(prefixes))
        if count > MAX_PREFIXES_PER_LIST:
            col.add(
                draft.path,
                f"{label} ({' + '.join((*address_keys, *list_keys))}) would hold {count} prefixes,"
                f" at most {MAX_PREFIXES_PER_LIST} allowed",
            )


# --------------------------------------------------------------------------
# Rules across networks
# --------------------------------------------------------------------------


def _check_across_networks(col: _Collector, drafts: list[_Draft]) -> None:
    _check_duplicate_addresses(col, drafts)
    _check_duplicate_interfaces(col, drafts)
    _check_listen_ports(col, drafts)
    _check_overlaps(col, drafts)


def _check_duplicate_addresses(col: _Collector, drafts: list[_Draft]) -> None:
    """No tunnel address (local or peer) twice across networks."""
    seen: dict[IPAddress, tuple[int, str]] = {}
    for index, draft in enumerate(drafts):
        for version in (4, 6):
            for side in ("local", "peer"):
                key = f"{side}_ipv{version}"
                iface = draft.get(key)
                if not isinstance(iface, _INTERFACE_TYPES):
                    continue
                first = seen.setdefault(iface.ip, (index, draft.key(key)))
                if first[0] != index:  # within one network, _check_addresses reports it
                    col.add(draft.key(key), f"{iface.ip} is already used by {first[1]}")


def _check_duplicate_interfaces(col: _Collector, drafts: list[_Draft]) -> None:
    seen: dict[str, str] = {}
    for draft in drafts:
        name = draft.get("interface")
        if not isinstance(name, str):
            continue
        if name in seen:
            col.add(draft.key("interface"), f"{name!r} is already used by {seen[name]}")
        else:
            seen[name] = draft.key("interface")


def _addresses_collide(a: IPAddress, b: IPAddress) -> bool:
    """Whether binding UDP sockets to `a` and `b` on one port would conflict.

    A wildcard address collides with every address of its family; ``::`` also
    with IPv4, since a Linux dual-stack socket claims the IPv4 port too.
    """
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if x.is_unspecified and (x.version == y.version or x.version == 6):
            return True
    return False


def _check_listen_ports(col: _Collector, drafts: list[_Draft]) -> None:
    """Listen networks must not need the same UDP port on colliding addresses."""
    binds: list[tuple[_Draft, IPAddress, int, int]] = []
    for draft in drafts:
        u, queues = draft.underlay, draft.get("queues")
        if draft.get("role") != "listen" or u is None or not isinstance(queues, int):
            continue
        local, port = u["local"], u["port"]
        if not isinstance(local, _ADDRESS_TYPES) or not isinstance(port, int):
            continue
        last = port + queues - 1
        for other, olocal, oport, olast in binds:
            if port <= olast and oport <= last and _addresses_collide(local, olocal):
                col.add(
                    _join(draft.key("underlay"), "port"),
                    f"UDP ports {port}..{last} on {local} collide with {other.key('underlay')}"
                    f" (ports {oport}..{olast} on {olocal})",
                )
                break
        binds.append((draft, local, port, last))


@dataclasses.dataclass(frozen=True, slots=True)
class _RouteEntry:
    net: IPNetwork
    path: str
    draft: int
    tunnel: bool

    def describe(self) -> str:
        return f"tunnel subnet {self.net}" if self.tunnel else str(self.net)


def _check_overlaps(col: _Collector, drafts: list[_Draft]) -> None:
    """Overlapping routes need allow_overlap.

    Considered: every accepted_routes entry, and each network's tunnel subnets
    (the connected routes of its interface). Two entries of one network
    conflict when both are accepted routes and the network does not allow
    overlap; entries of two networks conflict unless either network allows it.
    Each entry reports at most one conflict, with its innermost conflicting
    enclosing prefix. A sweep over the sorted prefixes keeps this linear
    apart from the nesting depth.
    """
    entries: list[_RouteEntry] = []
    for index, draft in enumerate(drafts):
        for key in ("local_ipv4", "local_ipv6"):
            iface = draft.get(key)
            if isinstance(iface, _INTERFACE_TYPES):
                entries.append(_RouteEntry(iface.network, draft.key(key), index, True))
        routes = draft.get("accepted_routes")
        if _ok(routes):
            for i, net in enumerate(routes):
                if net is not None:
                    entries.append(_RouteEntry(net, f"{draft.key('accepted_routes')}[{i}]", index, False))

    # An invalid allow_overlap counts as allowed: its error is reported already.
    allowed = [d.get("allow_overlap") is not False for d in drafts]

    for version in (4, 6):
        family = sorted(
            (e for e in entries if e.net.version == version),
            key=lambda e: (int(e.net.network_address), e.net.prefixlen),
        )
        stack: list[_RouteEntry] = []
        for entry in family:
            while stack and not entry.net.subnet_of(stack[-1].net):  # type: ignore[arg-type]
                stack.pop()
            for outer in reversed(stack):
                if outer.draft == entry.draft:
                    if outer.tunnel or entry.tunnel or allowed[entry.draft]:
                        continue
                    where = drafts[entry.draft].path
                elif allowed[entry.draft] or allowed[outer.draft]:
                    continue
                else:
                    where = f"{drafts[outer.draft].path} or {drafts[entry.draft].path}"
                col.add(
                    entry.path,
                    f"{entry.describe()} overlaps {outer.describe()} at {outer.path};"
                    f" set allow_overlap = true on {where} to permit this",
                )
                break
            stack.append(entry)
