"""The request table: roles, once-only, order, refusals and their audit lines."""

from __future__ import annotations

import errno
import os
import itertools
import socket
from typing import Any

import pytest

from l3ptp.helper.dispatch import TABLE, ClientCreds, ClientSession, Dispatcher, Violation
from l3ptp.helper.state import HelperState
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc import helper_messages as hm
from tests.support.helper_fixtures import CONTROLLER_UID, WORKER_UID, FakeClock, FakeKernel, make_policy


class Env:
    def __init__(self, **policy: Any) -> None:
        self.kernel = FakeKernel()
        self.clock = FakeClock()
        self.records: list[dict[str, Any]] = []
        counter = itertools.count()
        self.state = HelperState(ticket_ttl=30.0, token=lambda: f"{next(counter):032d}")
        self.d = Dispatcher(make_policy(**policy), self.state, self.kernel, self._audit, self.clock)

    def _audit(self, action: str, **fields: Any) -> None:
        self.records.append({"action": action, **fields})

    def session(self, role: hm.Role | None, uid: int | None = None) -> ClientSession:
        uid = uid if uid is not None else (WORKER_UID if role is hm.Role.WORKER else CONTROLLER_UID)
        s = ClientSession(ClientCreds(pid=42, uid=uid, gid=uid))
        if role is not None:
            assert isinstance(self.d.handle(s, hm.Hello(role=role, protocol=hm.HELPER_PROTOCOL)).reply, hm.Welcome)
        return s

    def create(self, s: ClientSession, name: str = "n1", queues: int = 2, **kw: Any):
        args = dict(name=name, ifname=f"l3p-{name}", mtu=1280, addresses=("198.19.1.1/24", "fd00:1::1/64"),
                    queues=queues, worker_uid=WORKER_UID, adopt=False)
        args.update(kw)
        return self.d.handle(s, hm.CreateNetwork(**args)).reply

    def last(self) -> dict[str, Any]:
        return self.records[-1]


@pytest.fixture
def make_env():
    envs: list[Env] = []

    def make(**policy: Any) -> Env:
        envs.append(Env(**policy))
        return envs[-1]

    yield make
    for env in envs:
        env.kernel.close()


def test_table_is_closed_and_covers_every_request() -> None:
    assert set(TABLE) == set(hm.HELPER_REQUESTS.types)
    assert TABLE[hm.ClaimQueue].once and TABLE[hm.Hello].once
    assert TABLE[hm.CreateNetwork].roles == {hm.Role.CONTROLLER}
    assert TABLE[hm.ClaimQueue].roles == {hm.Role.WORKER}


def test_request_before_hello_is_a_violation(make_env) -> None:
    env = make_env()
    s = env.session(None)
    with pytest.raises(Violation):
        env.d.handle(s, hm.ListNetworks())
    assert env.last()["result"] == "violation" and env.last()["peer"].uid == CONTROLLER_UID


@pytest.mark.parametrize(("role", "uid"),
                         [(hm.Role.CONTROLLER, WORKER_UID), (hm.Role.WORKER, CONTROLLER_UID), (hm.Role.WORKER, 65534)])
def test_hello_with_uid_not_in_role_list(make_env, role: hm.Role, uid: int) -> None:
    env = make_env()
    s = ClientSession(ClientCreds(pid=1, uid=uid, gid=uid))
    with pytest.raises(Violation):
        env.d.handle(s, hm.Hello(role=role, protocol=hm.HELPER_PROTOCOL))
    assert s.role is None and env.last()["result"] == "violation"


def test_hello_wrong_protocol_and_twice(make_env) -> None:
    env = make_env()
    with pytest.raises(Violation):
        env.d.handle(env.session(None), hm.Hello(role=hm.Role.CONTROLLER, protocol=hm.HELPER_PROTOCOL + 1))
    s = env.session(hm.Role.CONTROLLER)
    with pytest.raises(Violation):
        env.d.handle(s, hm.Hello(role=hm.Role.CONTROLLER, protocol=hm.HELPER_PROTOCOL))


@pytest.mark.parametrize(
    "request_",
    [
        hm.CreateNetwork(name="n", ifname="l3p-n", mtu=1280, addresses=(), queues=1, worker_uid=WORKER_UID,
                         adopt=False),
        hm.AddRoutes(name="n", routes=(), metric=1, allow_default=False),
        hm.RemoveRoutes(name="n", routes=()),
        hm.DestroyNetwork(name="n"),
        hm.ListNetworks(),
    ],
)
def test_worker_may_not_send_controller_requests(make_env, request_) -> None:
    env = make_env()
    with pytest.raises(Violation):
        env.d.handle(env.session(hm.Role.WORKER), request_)
    assert env.kernel.calls == []


def test_controller_may_not_claim_or_protect(make_env) -> None:
    env = make_env()
    with pytest.raises(Violation):
        env.d.handle(env.session(hm.Role.CONTROLLER), hm.ClaimQueue(ticket="0" * 32))
    with pytest.raises(Violation):
        env.d.handle(env.session(hm.Role.CONTROLLER), hm.ProtectSocket(), [5])


def test_create_claim_destroy(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    created = env.create(c)
    assert isinstance(created, hm.NetworkCreated) and len(created.tickets) == 2 and not created.adopted
    assert env.last()["result"] == "ok" and env.last()["ifname"] == "l3p-n1"
    fds = env.state.networks["n1"].fds
    for q, ticket in enumerate(created.tickets):
        w = env.session(hm.Role.WORKER)
        out = env.d.handle(w, hm.ClaimQueue(ticket=ticket))
        assert isinstance(out.reply, hm.QueueGranted) and out.reply.queue == q and out.fd == fds[q]
    destroyed = env.d.handle(c, hm.DestroyNetwork(name="n1")).reply
    assert isinstance(destroyed, hm.NetworkDestroyed)
    assert env.kernel.links == {} and env.state.networks == {}


def test_claim_is_once_per_connection_and_ticket_single_use(make_env) -> None:
    env = make_env()
    t0, t1 = env.create(env.session(hm.Role.CONTROLLER)).tickets
    w = env.session(hm.Role.WORKER)
    assert env.d.handle(w, hm.ClaimQueue(ticket=t0)).fd is not None
    with pytest.raises(Violation):
        env.d.handle(w, hm.ClaimQueue(ticket=t1))
    again = env.d.handle(env.session(hm.Role.WORKER), hm.ClaimQueue(ticket=t0))
    assert isinstance(again.reply, hm.Failed) and again.fd is None and again.reply.code is ErrorCode.NOT_FOUND
    assert env.last()["result"] == "refused"


def test_expired_ticket_gets_no_fd(make_env) -> None:
    env = make_env()
    t0, _ = env.create(env.session(hm.Role.CONTROLLER)).tickets
    env.clock.advance(30.0)
    out = env.d.handle(env.session(hm.Role.WORKER), hm.ClaimQueue(ticket=t0))
    assert out.fd is None and out.reply.code is ErrorCode.EXPIRED


def test_ticket_of_another_worker_uid(make_env) -> None:
    env = make_env(worker_uids=[WORKER_UID, 2000])
    t0, _ = env.create(env.session(hm.Role.CONTROLLER), worker_uid=2000).tickets
    out = env.d.handle(env.session(hm.Role.WORKER, uid=WORKER_UID), hm.ClaimQueue(ticket=t0))
    assert out.fd is None and out.reply.code is ErrorCode.NOT_PERMITTED


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"ifname": "eth0"}, ErrorCode.OUT_OF_POLICY),
        ({"ifname": "l3p-"}, ErrorCode.OUT_OF_POLICY),
        ({"addresses": ("198.18.0.1/24",)}, ErrorCode.OUT_OF_POLICY),
        ({"worker_uid": 0}, ErrorCode.OUT_OF_POLICY),
        ({"queues": 5}, ErrorCode.LIMIT),
    ],
)
def test_create_refusals_have_no_side_effect(make_env, kw, code) -> None:
    env = make_env()
    reply = env.create(env.session(hm.Role.CONTROLLER), **kw)
    assert isinstance(reply, hm.Failed) and reply.code is code
    assert env.kernel.calls == [] and env.state.networks == {}
    assert env.last()["result"] == "refused" and env.last()["code"] == code.name


def test_create_existing_and_adopt(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    first = env.create(c)
    assert env.create(c).code is ErrorCode.EXISTS
    assert env.create(c, mtu=1400, adopt=True).code is ErrorCode.EXISTS
    adopted = env.create(c, adopt=True, addresses=("fd00:1::1/64", "198.19.1.1/24"))
    assert adopted.adopted and adopted.ifindex == first.ifindex and set(adopted.tickets).isdisjoint(first.tickets)
    # the old tickets no longer work
    assert env.d.handle(env.session(hm.Role.WORKER), hm.ClaimQueue(ticket=first.tickets[0])).fd is None
    assert env.create(c, name="n2", ifname="l3p-n1").code is ErrorCode.EXISTS
    assert len([x for x in env.kernel.calls if x[0] == "create"]) == 1


def test_kernel_ebusy_becomes_failed_busy(make_env) -> None:
    env = make_env()
    env.kernel.links["l3p-n1"] = 3  # somebody else's device
    reply = env.create(env.session(hm.Role.CONTROLLER))
    assert reply.code is ErrorCode.BUSY and env.state.networks == {}


def test_max_networks(make_env) -> None:
    env = make_env(max_networks=1)
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    assert env.create(c, name="n2").code is ErrorCode.LIMIT


def test_routes_inside_policy_only_and_all_or_nothing(make_env) -> None:
    env = make_env(allow_default_route=False)
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    ok = env.d.handle(c, hm.AddRoutes(name="n1", routes=("198.19.2.0/24", "fd00:2::/64"), metric=5,
                                      allow_default=False))
    assert isinstance(ok.reply, hm.RoutesChanged) and ok.reply.routes == ("198.19.2.0/24", "fd00:2::/64")
    before = list(env.kernel.calls)
    for routes, allow in [(("198.19.3.0/24", "198.18.0.0/24"), False), (("0.0.0.0/0",), True), (("::/0",), False)]:
        out = env.d.handle(c, hm.AddRoutes(name="n1", routes=routes, metric=5, allow_default=allow))
        assert out.reply.code is ErrorCode.OUT_OF_POLICY and env.last()["result"] == "refused"
    assert env.kernel.calls == before
    env.kernel.fail_next = errno.EEXIST
    out = env.d.handle(c, hm.AddRoutes(name="n1", routes=("198.19.9.0/24",), metric=5, allow_default=False))
    assert out.reply.code is ErrorCode.EXISTS and "198.19.9.0/24" not in env.state.networks["n1"].routes


def test_default_route_when_policy_and_request_allow(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    out = env.d.handle(c, hm.AddRoutes(name="n1", routes=("0.0.0.0/0",), metric=5, allow_default=True))
    assert out.reply.routes == ("0.0.0.0/0",)


def test_route_limit_and_unknown_network(make_env) -> None:
    env = make_env(max_routes=1)
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    out = env.d.handle(c, hm.AddRoutes(name="n1", routes=("198.19.2.0/24", "198.19.3.0/24"), metric=5,
                                       allow_default=False))
    assert out.reply.code is ErrorCode.LIMIT
    assert env.d.handle(c, hm.DestroyNetwork(name="nope")).reply.code is ErrorCode.NOT_FOUND


def test_remove_only_our_routes(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    env.d.handle(c, hm.AddRoutes(name="n1", routes=("198.19.2.0/24",), metric=5, allow_default=False))
    before = list(env.kernel.calls)
    out = env.d.handle(c, hm.RemoveRoutes(name="n1", routes=("198.19.2.0/24", "198.19.7.0/24")))
    assert out.reply.code is ErrorCode.NOT_FOUND and env.kernel.calls == before
    out = env.d.handle(c, hm.RemoveRoutes(name="n1", routes=("198.19.2.0/24",)))
    assert out.reply.routes == () and env.kernel.routes == set()
    destroyed = env.d.handle(c, hm.DestroyNetwork(name="n1")).reply
    assert destroyed.routes_removed == ()


def test_list_networks(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    listed = env.d.handle(c, hm.ListNetworks()).reply
    assert isinstance(listed, hm.NetworkList) and [n.ifname for n in listed.networks] == ["l3p-n1"]


def test_protect_socket_needs_exactly_one_fd_and_unexpected_fds_are_audited(make_env) -> None:
    env = make_env()
    a, b = socket.socketpair()
    try:
        out = env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(), [a.fileno()])
        assert isinstance(out.reply, hm.SocketProtected)
        for fds in ([], [a.fileno(), b.fileno()]):
            with pytest.raises(Violation):
                env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(), fds)
        env.d.handle(env.session(hm.Role.CONTROLLER), hm.ListNetworks(), [a.fileno()])
        assert env.last()["result"] == "fds_discarded"
    finally:
        a.close()
        b.close()


def test_rules_are_ensured_before_routes_and_sockets_and_audited_when_added(make_env) -> None:
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c)
    env.d.handle(c, hm.AddRoutes(name="n1", routes=(), metric=5, allow_default=False))
    assert ("ensure_rules",) not in env.kernel.calls  # nothing to route, nothing to install
    env.d.handle(c, hm.AddRoutes(name="n1", routes=("0.0.0.0/0",), metric=5, allow_default=True))
    calls = [x[0] for x in env.kernel.calls]
    assert calls.index("ensure_rules") < calls.index("add_route")
    a, b = socket.socketpair()
    try:
        reply = env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(), [a.fileno()]).reply
        assert isinstance(reply, hm.SocketProtected)
    finally:
        a.close()
        b.close()
    assert calls.count("ensure_rules") + 1 == [x[0] for x in env.kernel.calls].count("ensure_rules")
    added = [r for r in env.records if r["action"] == "AddRules"]
    assert len(added) == 1 and added[0]["rules"] == env.kernel.rules and added[0]["result"] == "ok"


def test_offload_is_recorded_in_the_alias_and_part_of_the_spec(make_env) -> None:
    """TUN offloads (IFF_VNET_HDR) are the device's: the alias records them (netops creates and adopts by it),
    and a network asked for in the other mode is another spec (EXISTS), never silently reused."""
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    assert isinstance(env.create(c, offload=True), hm.NetworkCreated)
    assert env.kernel.aliases["l3p-n1"] == f"n1:2:{WORKER_UID}:vnet"
    assert env.last()["offload"] is True
    assert env.create(c, adopt=True).code is ErrorCode.EXISTS  # offload off now: another spec
    assert env.create(c, adopt=True, offload=True).adopted
    assert isinstance(env.create(c, name="n2"), hm.NetworkCreated)
    assert env.kernel.aliases["l3p-n2"] == f"n2:2:{WORKER_UID}"


def test_steer_makes_the_map_and_sends_its_fd_and_a_new_helper_takes_the_kept_one(make_env) -> None:
    """CreateNetwork(steer) answers with the network's steering map fd (kept by the controller); a restarted
    helper given that fd with its CreateNetwork(adopt) builds on it (helper/reuseport.py, "Lifetime")."""
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    out = env.d.handle(c, hm.CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=("198.19.1.1/24",),
                                           queues=2, worker_uid=WORKER_UID, adopt=False, steer=True))
    assert out.reply.steering and out.fd == env.kernel.maps["n1"]
    assert env.last()["steering"] == "new"
    again = env.d.handle(c, hm.CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=("198.19.1.1/24",),
                                             queues=2, worker_uid=WORKER_UID, adopt=True, steer=True))
    assert again.reply.adopted and again.fd == out.fd and env.last()["steering"] == "kept"
    plain = env.create(c, name="n2")
    assert not plain.steering and "n2" not in env.kernel.maps

    new = make_env()  # the restarted helper, which adopted the device; the controller sends the map it kept
    new.state.add(env.state.networks["n1"])
    kept = new.d.handle(new.session(hm.Role.CONTROLLER),
                        hm.CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=("198.19.1.1/24",),
                                         queues=2, worker_uid=WORKER_UID, adopt=True, steer=True), [out.fd])
    assert kept.reply.steering and kept.fd == new.kernel.maps["n1"] and new.last()["steering"] == "adopted"
    assert new.kernel.kept_from["n1"] == os.fstat(out.fd).st_ino
    # a kept fd with any other request is discarded, as every unexpected fd
    new.d.handle(new.session(hm.Role.CONTROLLER), hm.ListNetworks(), [out.fd])
    assert new.last()["result"] == "fds_discarded"
    env.d.destroy(env.state.networks["n1"])
    assert "n1" not in env.kernel.maps
