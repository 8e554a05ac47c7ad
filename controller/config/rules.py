"""l3ptp's cross-field rules: within one network, then across networks.

The rules see `Draft` values that may be `BAD` (their error is recorded
already) and only judge what was read successfully.
"""

from __future__ import annotations

import dataclasses

from l3ptp.controller.config.draft import Draft
from l3ptp.controller.config.errors import BAD, Collector, join, ok
from l3ptp.controller.config.model import ADDRESS_TYPES, INTERFACE_TYPES, IPAddress, IPNetwork, host_prefix
from l3ptp.controller.config.schema import IPV6_MIN_MTU, PREFIX_LISTS
from l3ptp.ipc.constants import HEADER_LEN, MAX_PREFIXES_PER_LIST, QUIC_DATAGRAM_OVERHEAD_MAX, datagram_budget


def check_addresses(col: Collector, draft: Draft) -> None:
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
        if not (isinstance(local, INTERFACE_TYPES) and isinstance(peer, INTERFACE_TYPES)):
            continue
        ppath = draft.key(pkey)
        if peer.network.prefixlen != local.network.prefixlen:
            col.add(ppath, f"prefix length /{peer.network.prefixlen} differs from {lkey}'s /{local.network.prefixlen}")
        if peer.ip == local.ip:
            col.add(ppath, f"{peer.ip} is the same address as {lkey}")
        elif peer.ip not in local.network:
            col.add(ppath, f"{peer.ip} is outside {lkey}'s subnet {local.network}")


def check_mtu(col: Collector, draft: Draft) -> None:
    mtu, mds = draft.get("mtu"), draft.get("max_datagram_size")
    if not ok(mtu):
        return
    if ok(mds):
        budget = datagram_budget(mds)
        if draft.get("mtu_auto") is True and mtu > budget:
            col.add(
                draft.key("max_datagram_size"),
                f"{mds} caps the QUIC packet size of mtu = \"auto\" at a DATAGRAM budget of {budget},"
                f" below the fallback {mtu}; raise it to at least {mtu + mds - budget} or leave it out",
            )
        elif mtu > budget:
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


def check_prefixes(col: Collector, draft: Draft) -> None:
    """Families of listed prefixes, the default-route opt-in, derived list sizes."""
    families: dict[int, bool | None] = {}  # version -> has a tunnel address (None: unknown)
    for version in (4, 6):
        local = draft.get(f"local_ipv{version}")
        families[version] = None if local is BAD else local is not None
    allow_default = draft.get("allow_default_route")
    for key in PREFIX_LISTS:
        items = draft.get(key)
        if not ok(items):
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
        if not ok(*parts):
            continue
        prefixes = [host_prefix(a) for a in parts[: len(address_keys)] if a is not None]
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


def check_across_networks(col: Collector, drafts: list[Draft]) -> None:
    _check_duplicate_addresses(col, drafts)
    _check_duplicate_interfaces(col, drafts)
    _check_listen_ports(col, drafts)
    _check_overlaps(col, drafts)


def _check_duplicate_addresses(col: Collector, drafts: list[Draft]) -> None:
    """No tunnel address (local or peer) twice across networks."""
    seen: dict[IPAddress, tuple[int, str]] = {}
    for index, draft in enumerate(drafts):
        for version in (4, 6):
            for side in ("local", "peer"):
                key = f"{side}_ipv{version}"
                iface = draft.get(key)
                if not isinstance(iface, INTERFACE_TYPES):
                    continue
                first = seen.setdefault(iface.ip, (index, draft.key(key)))
                if first[0] != index:  # within one network, check_addresses reports it
                    col.add(draft.key(key), f"{iface.ip} is already used by {first[1]}")


def _check_duplicate_interfaces(col: Collector, drafts: list[Draft]) -> None:
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


def _check_listen_ports(col: Collector, drafts: list[Draft]) -> None:
    """Listen networks must not need the same UDP port on colliding addresses."""
    binds: list[tuple[Draft, IPAddress, int, int]] = []
    for draft in drafts:
        u, queues = draft.underlay, draft.get("queues")
        if draft.get("role") != "listen" or u is None or not isinstance(queues, int):
            continue
        local, port = u["local"], u["port"]
        if not isinstance(local, ADDRESS_TYPES) or not isinstance(port, int):
            continue
        last = port + queues - 1 if u.get("ports") == "per-queue" else port
        for other, olocal, oport, olast in binds:
            if port <= olast and oport <= last and _addresses_collide(local, olocal):
                col.add(
                    join(draft.key("underlay"), "port"),
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


def _check_overlaps(col: Collector, drafts: list[Draft]) -> None:
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
            if isinstance(iface, INTERFACE_TYPES):
                entries.append(_RouteEntry(iface.network, draft.key(key), index, True))
        routes = draft.get("accepted_routes")
        if ok(routes):
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
