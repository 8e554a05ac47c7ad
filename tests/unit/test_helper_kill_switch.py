"""The helper's kill switch (pure): an `unreachable` route for every prefix a network routes or addresses,
added before its tunnel route, removed only when the network or route is explicitly removed; adoption of the
networks a previous helper left."""

from __future__ import annotations

import os
import socket

import pytest

from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc.constants import KILL_SWITCH_METRIC
from l3ptp.ipc.errors import ErrorCode
from tests.support.helper_fixtures import WORKER_UID
from tests.unit.test_helper_dispatch import Env, make_env  # noqa: F401 (fixture)

ADDR_NETS = {"198.19.1.0/24", "fd00:1::/64"}


def routes(env: Env, s, name: str, *prefixes: str, metric: int = 100):
    return env.d.handle(s, hm.AddRoutes(name=name, routes=prefixes, metric=metric, allow_default=False)).reply


def test_create_guards_the_address_networks_and_routes_are_guarded_before_they_exist(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    assert isinstance(env.create(c), hm.NetworkCreated)
    assert env.kernel.kill_switch_routes == ADDR_NETS
    assert env.kernel.aliases["l3p-n1"] == f"n1:2:{WORKER_UID}"
    assert isinstance(routes(env, c, "n1", "198.19.5.0/24"), hm.RoutesChanged)
    assert env.kernel.kill_switch_routes == ADDR_NETS | {"198.19.5.0/24"}
    order = [call[:3] for call in env.kernel.calls if call[0] in ("kill_switch", "add_route")]
    assert order.index(("kill_switch", "add", "198.19.5.0/24")) < order.index(("add_route", 11, "198.19.5.0/24"))


def test_removed_route_and_destroyed_network_drop_their_kill_switch_shared_ones_stay(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c, "n1")
    env.create(c, "n2", addresses=("198.19.2.1/24",))
    routes(env, c, "n1", "198.19.5.0/24", "198.19.6.0/24")
    routes(env, c, "n2", "198.19.6.0/24")
    env.d.handle(c, hm.RemoveRoutes(name="n1", routes=("198.19.5.0/24", "198.19.6.0/24")))
    assert env.kernel.kill_switch_routes == ADDR_NETS | {"198.19.2.0/24", "198.19.6.0/24"}  # n2 still routes .6
    assert isinstance(env.d.handle(c, hm.DestroyNetwork(name="n2")).reply, hm.NetworkDestroyed)
    assert env.kernel.kill_switch_routes == ADDR_NETS
    env.d.handle(c, hm.DestroyNetwork(name="n1"))
    assert env.kernel.kill_switch_routes == set()


def test_kill_switch_metric_is_refused_for_tunnel_routes(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    reply = routes(env, c, "n1", "198.19.5.0/24", metric=KILL_SWITCH_METRIC)
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.OUT_OF_POLICY
    assert env.kernel.kill_switch_routes == ADDR_NETS


def test_failed_kill_switch_fails_the_create_and_leaves_nothing(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    real = env.kernel.kill_switch

    def failing(op: str, prefix: str) -> None:
        if op == "add" and prefix.startswith("fd00"):
            raise OSError(1, "Operation not permitted")
        real(op, prefix)

    env.kernel.kill_switch = failing  # type: ignore[method-assign]
    reply = env.create(c)
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.NOT_PERMITTED
    assert env.kernel.links == {} and env.kernel.kill_switch_routes == set() and env.state.networks == {}


def _found(env: Env, name: str = "n1", uid: int = WORKER_UID) -> dict:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env.kernel._peers[a.fileno()] = b  # closed with the kernel
    env.kernel.links[f"l3p-{name}"] = 7
    return {"name": name, "ifname": f"l3p-{name}", "ifindex": 7, "mtu": 1280,
            "addresses": ("198.19.1.1/24", "fd00:1::1/64"), "queues": 1, "worker_uid": uid,
            "fds": [a.detach()], "detached": {0}, "routes": {"198.19.5.0/24": 100}}


def test_adopt_keeps_the_network_and_its_kill_switch_and_removes_only_orphans(make_env) -> None:
    env = make_env()
    done = env.d.adopt([_found(env)], ["198.19.5.0/24", "198.19.1.0/24", "198.19.99.0/24"])
    assert done == {"adopted": ["n1"], "destroyed": [], "kill_switch_removed": ["198.19.99.0/24"]}
    assert env.kernel.kill_switch_routes == {"fd00:1::/64"}  # the one that was missing, added
    c = env.session(hm.Role.CONTROLLER)
    again = env.create(c, queues=1, addresses=("fd00:1::1/64", "198.19.1.1/24"), adopt=True)
    assert isinstance(again, hm.NetworkCreated) and again.adopted
    w = env.session(hm.Role.WORKER)
    out = env.d.handle(w, hm.ClaimQueue(ticket=again.tickets[0]))
    assert isinstance(out.reply, hm.QueueGranted)
    assert ("attach", out.fd) in env.kernel.calls and env.state.networks["n1"].detached == set()


def test_adopt_destroys_a_network_outside_the_policy(make_env) -> None:
    env = make_env()
    found = _found(env, uid=4242)
    done = env.d.adopt([found], ["198.19.5.0/24"])
    assert done == {"adopted": [], "destroyed": ["l3p-n1"], "kill_switch_removed": ["198.19.5.0/24"]}
    assert env.state.networks == {} and "l3p-n1" not in env.kernel.links
    with pytest.raises(OSError):
        os.fstat(found["fds"][0] if found["fds"] else -1)
