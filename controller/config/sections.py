"""Per-section readers: ``[node]``, ``[controller]``, ``[metrics]``, ``[networks.*]``.

Each reads its table's keys with the field readers; a network comes back as a
`Draft` after its own rules (rules.py) ran on it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from l3ptp.controller.config.draft import Draft
from l3ptp.controller.config.errors import BAD, REQUIRED, Bad, Collector, Converter, join, ok
from l3ptp.controller.config.fields import (
    absolute_path,
    boolean,
    choice,
    integer,
    ip_address,
    number,
    optional_path,
    prefix_list,
)
from l3ptp.controller.config.model import ADDRESS_TYPES
from l3ptp.controller.config.reality import hostname, parse_reality
from l3ptp.controller.config.rules import check_addresses, check_mtu, check_prefixes
from l3ptp.controller.config.schema import (
    CONTROLLER_KEYS,
    ENGINES,
    EVENT_LOOPS,
    METRICS_KEYS,
    NETWORK_KEYS,
    NETWORK_NAME_RE,
    NODE_KEYS,
    OFFLOAD_DEFAULT,
    OFFLOADS,
    PORT_MAX,
    PORT_MODES,
    PREFIX_LISTS,
    ROLES,
    ROUTE_METRIC_MAX,
    STATUS_INTERVAL_MAX,
    STATUS_INTERVAL_MIN,
    UNDERLAY_KEYS,
)
from l3ptp.controller.config.values import (
    account_name,
    cpu_list,
    interface_prefix,
    interface_problems,
    node_id,
    peer_key,
    tunnel_address,
)
from l3ptp.controller.config.values import peer_keys as peer_keys_of
from l3ptp.ipc.constants import (
    HELPER_SOCKET_DEFAULT,
    IFNAME_PREFIX_DEFAULT,
    KEEPALIVE_INTERVAL_DEFAULT,
    KEEPALIVE_INTERVAL_MAX,
    KEEPALIVE_INTERVAL_MIN,
    MAX_DATAGRAM_SIZE_DEFAULT,
    MAX_DATAGRAM_SIZE_MAX,
    MAX_DATAGRAM_SIZE_MIN,
    MAX_NETWORKS,
    MAX_QUEUES,
    METRICS_ADDRESS_DEFAULT,
    METRICS_PORT_DEFAULT,
    MTU_AUTO,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    NETWORK_NAME_MAX,
    ROUTE_METRIC_DEFAULT,
    RUNTIME_DIR_DEFAULT,
    STATUS_INTERVAL,
)


def parse_node(col: Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    if "node" not in top:
        col.add("node", "required")
        return None
    tbl = col.table(top["node"], "node", NODE_KEYS)
    if tbl is None:
        return None
    values = {
        "id": col.field(tbl, "node", "id", node_id),
        "key_file": col.field(tbl, "node", "key_file", absolute_path),
    }
    return values if ok(*values.values()) else None


def parse_controller(col: Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    """Controller settings; None if the table is not a table. Fields may be `BAD`."""
    tbl = col.table(top.get("controller", {}), "controller", CONTROLLER_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: Converter, default: Any) -> Any:
        return col.field(tbl, "controller", key, convert, default)

    return {
        "runtime_dir": f("runtime_dir", absolute_path, RUNTIME_DIR_DEFAULT),
        "helper_socket": f("helper_socket", absolute_path, HELPER_SOCKET_DEFAULT),
        "interface_prefix": f("interface_prefix", interface_prefix, IFNAME_PREFIX_DEFAULT),
        "worker_user": f("worker_user", account_name, ""),
        "status_interval": f("status_interval", number(STATUS_INTERVAL_MIN, STATUS_INTERVAL_MAX), STATUS_INTERVAL),
        "admin_group": f("admin_group", account_name, ""),
        "polkit": f("polkit", boolean, False),
    }


def parse_metrics(col: Collector, top: Mapping[str, Any]) -> dict[str, Any] | None:
    tbl = col.table(top.get("metrics", {}), "metrics", METRICS_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: Converter, default: Any) -> Any:
        return col.field(tbl, "metrics", key, convert, default)

    return {
        "enabled": f("enabled", boolean, True),
        "address": f("address", ip_address, ipaddress.ip_address(METRICS_ADDRESS_DEFAULT)),
        "port": f("port", integer(1, PORT_MAX), METRICS_PORT_DEFAULT),
    }


def parse_networks(col: Collector, top: Mapping[str, Any], prefix: Any) -> list[Draft]:
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
        draft = _parse_network(col, name, body, join("networks", name), prefix)
        if draft is not None:
            drafts.append(draft)
    return drafts


def _parse_network(col: Collector, name: str, body: Any, path: str, prefix: Any) -> Draft | None:
    name_ok = bool(NETWORK_NAME_RE.fullmatch(name))
    if not name_ok:
        col.add(
            path,
            f"invalid network name {name!r}: must be 1..{NETWORK_NAME_MAX} characters of"
            " [a-z0-9_-], starting with a letter or digit",
        )
    tbl = col.table(body, path, NETWORK_KEYS)
    if tbl is None:
        return None

    def f(key: str, convert: Converter, default: Any = REQUIRED) -> Any:
        return col.field(tbl, path, key, convert, default)

    v: dict[str, Any] = {}
    v["enabled"] = f("enabled", boolean, True)
    v["interface"] = _network_interface(col, tbl, path, name if name_ok else None, prefix)
    v["role"] = f("role", choice(ROLES))
    mtu = f("mtu", mtu_setting, MTU_DEFAULT)
    # "auto": the controller derives mtu and max_datagram_size from the underlay path when the network
    # comes up (controller/mtu.py); until then mtu is the fallback and max_datagram_size the cap.
    v["mtu_auto"] = mtu == MTU_AUTO
    v["mtu"] = MTU_DEFAULT if v["mtu_auto"] else mtu
    v["max_datagram_size"] = f(
        "max_datagram_size", integer(MAX_DATAGRAM_SIZE_MIN, MAX_DATAGRAM_SIZE_MAX),
        MAX_DATAGRAM_SIZE_MAX if v["mtu_auto"] else MAX_DATAGRAM_SIZE_DEFAULT,
    )
    v["queues"] = f("queues", integer(1, MAX_QUEUES), 1)
    for version in (4, 6):
        for side in ("local", "peer"):
            v[f"{side}_ipv{version}"] = f(f"{side}_ipv{version}", tunnel_address(version), None)
    for key in PREFIX_LISTS:
        v[key] = f(key, prefix_list, ())
    v["install_routes"] = f("install_routes", boolean, True)
    v["allow_default_route"] = f("allow_default_route", boolean, False)
    v["allow_overlap"] = f("allow_overlap", boolean, False)
    v["route_metric"] = f("route_metric", integer(0, ROUTE_METRIC_MAX), ROUTE_METRIC_DEFAULT)
    v["keepalive_interval"] = f(
        "keepalive_interval",
        number(KEEPALIVE_INTERVAL_MIN, KEEPALIVE_INTERVAL_MAX),
        KEEPALIVE_INTERVAL_DEFAULT,
    )
    v["engine"] = f("engine", choice(ENGINES), "auto")
    v["event_loop"] = f("event_loop", choice(EVENT_LOOPS), "auto")
    v["offload"] = f("offload", choice(OFFLOADS), OFFLOAD_DEFAULT)
    v["cpus"] = f("cpus", cpu_list, ())
    v["peer_key"] = f("peer_key", peer_key, None)
    v["peer_keys"] = f("peer_keys", peer_keys_of, ())
    if v["peer_key"] is None and v["peer_keys"] == ():
        col.add(join(path, "peer_key"), "required")  # or peer_keys (docs/configuration.md)
        v["peer_key"] = BAD
    elif v["peer_key"] is None and v["peer_keys"] is not BAD:
        v["peer_key"] = v["peer_keys"][0][0]  # the first pinned key stands for the set where one is shown
    elif isinstance(v["peer_key"], str) and v["peer_keys"] and v["peer_keys"] is not BAD \
            and v["peer_key"] not in {k for k, _ in v["peer_keys"]}:
        v["peer_keys"] = ((v["peer_key"], 0.0), *v["peer_keys"])
    v["key_file"] = f("key_file", optional_path, "")

    draft = Draft(name=name, path=path, present=frozenset(tbl), values=v, underlay=None)
    draft.underlay = _parse_underlay(col, tbl, draft)
    v["reality"] = parse_reality(col, tbl, draft)
    check_addresses(col, draft)
    check_mtu(col, draft)
    check_prefixes(col, draft)
    return draft


def mtu_setting(value: Any, path: str, col: Collector) -> int | str | Bad:
    """`mtu`: an integer MTU_MIN..MTU_MAX, or "auto" (derived from the underlay path)."""
    if isinstance(value, str):
        if value == MTU_AUTO:
            return value
        col.add(path, f'{value!r} is not a valid MTU: an integer {MTU_MIN}..{MTU_MAX}, or "{MTU_AUTO}"')
        return BAD
    return integer(MTU_MIN, MTU_MAX)(value, path, col)


def _network_interface(
    col: Collector, tbl: Mapping[str, Any], path: str, name: str | None, prefix: Any
) -> str | Bad:
    """The interface name, explicit or derived as interface_prefix + name."""
    ipath = join(path, "interface")
    known_prefix = prefix if isinstance(prefix, str) else None
    if "interface" in tbl:
        value = tbl["interface"]
        if not isinstance(value, str):
            return col.type_error(ipath, "a string", value)
        problems = interface_problems(value, known_prefix)
        if problems:
            col.add(ipath, f"{value!r} " + "; ".join(problems))
            return BAD
        return value
    if name is None or known_prefix is None:
        return BAD  # the cause is reported already
    derived = known_prefix + name
    problems = interface_problems(derived, known_prefix)
    if problems:
        col.add(
            ipath,
            f"the default name {derived!r} (interface_prefix + network name) "
            + "; ".join(problems)
            + "; set interface explicitly",
        )
        return BAD
    return derived


def _peer_address(value: Any, path: str, col: Collector) -> Any:
    """A connector's `underlay.peer`: an IP address, or a DNS name (resolved by its workers at start and
    again at each reconnect)."""
    if isinstance(value, str) and hostname(value) is None:
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            return value
    if isinstance(value, str):
        col.add(path, f"{value!r} is neither an IP address nor a DNS name")
        return BAD
    return col.type_error(path, "a string", value)


def _parse_underlay(col: Collector, tbl: Mapping[str, Any], draft: Draft) -> dict[str, Any] | None:
    path = draft.key("underlay")
    if "underlay" not in tbl:
        col.add(path, "required")
        return None
    utbl = col.table(tbl["underlay"], path, UNDERLAY_KEYS)
    if utbl is None:
        return None
    local = col.field(utbl, path, "local", ip_address, None)
    role, queues = draft.get("role"), draft.get("queues")
    peer = col.field(utbl, path, "peer", _peer_address if role == "connect" else ip_address, None)
    port = col.field(utbl, path, "port", integer(1, PORT_MAX))
    ports = col.field(utbl, path, "ports", choice(PORT_MODES), "shared")
    lpath, ppath = join(path, "local"), join(path, "peer")

    if role == "listen" and local is None:
        col.add(lpath, "required for role 'listen' (the address to bind; 0.0.0.0 or :: for all)")
    if role == "connect" and peer is None:
        col.add(ppath, "required for role 'connect' (the address to connect to)")
    if isinstance(local, ADDRESS_TYPES) and local.is_multicast:
        col.add(lpath, f"{local} is a multicast address")
    if isinstance(peer, ADDRESS_TYPES) and (peer.is_unspecified or peer.is_multicast):
        col.add(ppath, f"{peer} is not a unicast address")
    if isinstance(local, ADDRESS_TYPES) and isinstance(peer, ADDRESS_TYPES) and local.version != peer.version:
        col.add(ppath, f"{peer} is IPv{peer.version} but underlay.local {local} is IPv{local.version}")
    if ports == "per-queue" and isinstance(port, int) and isinstance(queues, int) and port + queues - 1 > PORT_MAX:
        col.add(
            join(path, "port"),
            f"{port} with {queues} queues needs ports up to {port + queues - 1}, above {PORT_MAX}",
        )
    return {"local": local, "peer": peer, "port": port, "ports": ports}


