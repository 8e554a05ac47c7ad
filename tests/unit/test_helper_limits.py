"""The limits fit together: every helper reply is bounded by construction, and the config and the policy agree.

Sizes are derived from ipc.constants (longest names, most addresses, routes, queues, tickets, longest reason), not
from a hand-computed number: raise a limit and these tests say whether the replies still fit HELPER_MESSAGE_MAX.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from l3ptp.controller.config import parse_config
from l3ptp.helper.dispatch import ClientCreds, ClientSession, Dispatcher
from l3ptp.helper.policy import Policy, parse_policy
from l3ptp.helper.state import HelperState
from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc.constants import (HELPER_MESSAGE_MAX, IFNAME_MAX, MAX_ADDRESSES_PER_NETWORK, MAX_NETWORKS, MAX_QUEUES,
                                 MAX_ROUTES_PER_NETWORK, MTU_MAX, NETWORK_NAME_MAX, REASON_MAX, TICKET_BYTES)
from l3ptp.ipc.errors import ErrorCode
from tests.support.config_builders import KEY_A, config
from tests.support.helper_fixtures import FakeClock

U32_MAX = 2**32 - 1


def longest_prefixes(count: int, salt: int = 0) -> tuple[str, ...]:
    """`count` distinct IPv6 /128 prefixes of the longest canonical form (39 characters + "/128"), in fd00::/8."""
    out = tuple(f"fdff:ffff:ffff:ffff:ffff:{0xf000 + salt:x}:{0xf000 + i // 4096:x}:{0xf000 + i % 4096:x}/128"
                for i in range(count))
    assert all(len(p) == 43 and str(ipaddress.ip_network(p)) == p for p in out)
    return out


def worst_info(i: int = 0) -> hm.NetworkInfo:
    return hm.NetworkInfo(name=f"{i:02d}".ljust(NETWORK_NAME_MAX, "x"), ifname=f"l3p-{i:02d}".ljust(IFNAME_MAX, "x"),
                          ifindex=U32_MAX, mtu=MTU_MAX, queues=MAX_QUEUES,
                          addresses=longest_prefixes(MAX_ADDRESSES_PER_NETWORK, salt=0xfff),
                          routes=longest_prefixes(MAX_ROUTES_PER_NETWORK, salt=i), worker_uid=U32_MAX)


def worst_replies() -> dict[type, Any]:
    info = worst_info()
    return {
        hm.Welcome: hm.Welcome(role=hm.Role.CONTROLLER, protocol=0xFFFF, uid=U32_MAX),
        hm.NetworkCreated: hm.NetworkCreated(name=info.name, ifname=info.ifname, ifindex=U32_MAX,
                                             tickets=("A" * (TICKET_BYTES * 4 // 3),) * MAX_QUEUES,
                                             ticket_ttl=1e300, adopted=True),
        hm.QueueGranted: hm.QueueGranted(name=info.name, ifname=info.ifname, queue=MAX_QUEUES - 1, mtu=MTU_MAX),
        hm.RoutesChanged: hm.RoutesChanged(name=info.name, routes=info.routes),
        hm.SocketProtected: hm.SocketProtected(mark=U32_MAX),
        hm.NetworkDestroyed: hm.NetworkDestroyed(name=info.name, routes_removed=info.routes),
        hm.NetworkList: hm.NetworkList(networks=(info,), more=True),  # a page holds at least one network
        hm.Failed: hm.Failed(code=max(ErrorCode), reason="\U0001F600" * REASON_MAX),  # 4 UTF-8 bytes each
    }


def test_the_worst_case_of_every_reply_fits_the_cap() -> None:
    replies = worst_replies()
    assert set(replies) == set(hm.HELPER_REPLIES.types)  # a new reply type needs its worst case here
    for reply in replies.values():
        assert len(hm.HELPER_REPLIES.encode(reply)) <= HELPER_MESSAGE_MAX  # encode raises past the cap too


def test_the_worst_case_of_every_request_fits_the_cap() -> None:
    info = worst_info()
    requests = {
        hm.Hello: hm.Hello(role=hm.Role.CONTROLLER, protocol=0xFFFF),
        hm.CreateNetwork: hm.CreateNetwork(name=info.name, ifname=info.ifname, mtu=MTU_MAX, addresses=info.addresses,
                                           queues=MAX_QUEUES, worker_uid=U32_MAX, adopt=True),
        hm.ClaimQueue: hm.ClaimQueue(ticket="A" * (TICKET_BYTES * 4 // 3)),
        hm.AddRoutes: hm.AddRoutes(name=info.name, routes=info.routes, metric=U32_MAX, allow_default=True),
        hm.RemoveRoutes: hm.RemoveRoutes(name=info.name, routes=info.routes),
        hm.ProtectSocket: hm.ProtectSocket(),
        hm.DestroyNetwork: hm.DestroyNetwork(name=info.name),
        hm.ListNetworks: hm.ListNetworks(after=info.name),
    }
    assert set(requests) == set(hm.HELPER_REQUESTS.types)
    for request in requests.values():
        assert len(hm.HELPER_REQUESTS.encode(request)) <= HELPER_MESSAGE_MAX


class _Kernel:
    """Just enough kernel for dispatch: no fds (the real server test sends them)."""

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int,
                       alias: str = "") -> tuple[int, list[int]]:
        return U32_MAX, [-1] * queues

    def kill_switch(self, op: str, prefix: str) -> None:
        pass

    def add_route(self, ifindex: int, prefix: str, metric: int) -> None:
        pass

    def ensure_rules(self) -> list[str]:
        return []


def _dispatcher(policy: Policy) -> tuple[Dispatcher, ClientSession]:
    d = Dispatcher(policy, HelperState(), _Kernel(), lambda *a, **k: None, FakeClock())
    s = ClientSession(ClientCreds(1, 1000, 1000))
    d.handle(s, hm.Hello(role=hm.Role.CONTROLLER, protocol=hm.HELPER_PROTOCOL))
    return d, s


def test_pages_of_the_largest_state_hold_every_network_once_and_fit_the_cap() -> None:
    policy = parse_policy({"controller_uids": [1000], "worker_uids": [1000], "allowed_prefixes": ["fd00::/8"]})
    d, s = _dispatcher(policy)
    assert policy.max_networks == MAX_NETWORKS and policy.max_routes == MAX_ROUTES_PER_NETWORK
    for i in range(MAX_NETWORKS):
        info = worst_info(i)
        created = d.handle(s, hm.CreateNetwork(name=info.name, ifname=info.ifname, mtu=MTU_MAX, addresses=info.addresses,
                                               queues=MAX_QUEUES, worker_uid=1000, adopt=False)).reply
        assert isinstance(created, hm.NetworkCreated), created
        added = d.handle(s, hm.AddRoutes(name=info.name, routes=info.routes, metric=1, allow_default=False)).reply
        assert isinstance(added, hm.RoutesChanged) and len(added.routes) == MAX_ROUTES_PER_NETWORK
    seen: list[str] = []
    after = None
    while True:
        page = d.handle(s, hm.ListNetworks(after=after)).reply
        assert isinstance(page, hm.NetworkList) and page.networks
        assert len(hm.HELPER_REPLIES.encode(page)) <= HELPER_MESSAGE_MAX
        seen += [n.name for n in page.networks]
        if not page.more:
            break
        after = page.networks[-1].name
    assert seen == sorted(d.state.networks) and len(seen) == MAX_NETWORKS


def _largest_config() -> dict[str, Any]:
    nets = {}
    for i in range(MAX_NETWORKS):
        nets[f"n{i}".ljust(NETWORK_NAME_MAX, "x")] = {
            "role": "connect", "queues": MAX_QUEUES, "interface": f"l3p-{i}",
            "local_ipv4": f"198.19.{i}.1/24", "peer_ipv4": f"198.19.{i}.2/24",
            "local_ipv6": f"fd00:19:{i:x}::1/64", "peer_ipv6": f"fd00:19:{i:x}::2/64",
            "peer_key": KEY_A, "underlay": {"peer": "198.18.0.2", "port": 4433},
        }
    return config(nets)


def test_a_config_the_loader_accepts_never_meets_a_limit_of_the_default_policy() -> None:
    cfg = parse_config(_largest_config())
    assert len(cfg.networks) == MAX_NETWORKS and {n.queues for n in cfg.networks} == {MAX_QUEUES}
    policy = parse_policy({"controller_uids": [1000], "worker_uids": [1000],
                           "allowed_prefixes": ["198.19.0.0/16", "fd00::/8"]})  # every count at its default
    d, s = _dispatcher(policy)
    for net in cfg.networks:  # what controller/app.py asks for each network
        reply = d.handle(s, hm.CreateNetwork(name=net.name, ifname=net.interface, mtu=net.mtu,
                                             addresses=tuple(str(a) for a in net.addresses()), queues=net.queues,
                                             worker_uid=1000, adopt=False)).reply
        assert isinstance(reply, hm.NetworkCreated), reply
    assert len(d.state.networks) == MAX_NETWORKS


@pytest.mark.parametrize("key", ["max_networks", "max_queues", "max_routes"])
def test_a_policy_can_lower_but_not_raise_the_shared_limits(key: str) -> None:
    base = {"controller_uids": [0], "worker_uids": [0]}
    top = {"max_networks": MAX_NETWORKS, "max_queues": MAX_QUEUES, "max_routes": MAX_ROUTES_PER_NETWORK}[key]
    assert getattr(parse_policy(base), key) == top
    assert getattr(parse_policy({**base, key: 1}), key) == 1
    with pytest.raises(ValueError, match=key):
        parse_policy({**base, key: top + 1})


def test_the_shipped_policy_keeps_the_shared_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import pathlib
    import pwd
    import tomllib

    from l3ptp.helper import policy as helper_policy

    monkeypatch.setattr(helper_policy.pwd, "getpwnam",
                        lambda name: pwd.struct_passwd((name, "x", 998, 998, "", "/", "/usr/sbin/nologin")))
    path = pathlib.Path(__file__).resolve().parents[2] / "packaging/etc/helper-policy.toml"
    shipped = parse_policy(tomllib.loads(path.read_text()))
    assert (shipped.max_networks, shipped.max_queues, shipped.max_routes) == (
        MAX_NETWORKS, MAX_QUEUES, MAX_ROUTES_PER_NETWORK)
