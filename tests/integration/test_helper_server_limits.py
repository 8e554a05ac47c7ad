"""The real server loop at its limits, with a fake kernel and fake peer uids (no root).

The largest state the policy allows goes through every request type; a bug inside a request is answered, not
fatal; sessions are bounded per uid and in all with room kept for the controller; silent sessions time out; repeated
refusals are summarised; a close that blocks does not block the loop.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l3ptp.helper import server as server_mod
from l3ptp.helper.dispatch import ClientCreds, Outcome
from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import (KILL_SWITCH_METRIC, HELPER_AUDIT_WINDOW, HELPER_CONTROLLER_RESERVED, HELPER_IDLE_TIMEOUT_CONTROLLER,
                                 HELPER_IDLE_TIMEOUT_WORKER, HELPER_MAX_SESSIONS, HELPER_MAX_SESSIONS_PER_UID,
                                 MAX_NETWORKS, MAX_QUEUES, MAX_ROUTES_PER_NETWORK, MTU_MAX)
from l3ptp.ipc.errors import ErrorCode
from tests.integration import test_helper_server as server_test
from tests.support.helper_fixtures import Client, FakeKernel, make_policy
from tests.unit.test_helper_limits import worst_info

CONTROLLER, WORKER, WORKER2, WORKER3, OUTSIDER = 2000, 2001, 2002, 2003, 2999


class OneFdKernel(FakeKernel):
    """Every queue of every network is the same real fd: the largest state without thousands of fds."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int,
                       alias: str = "") -> tuple[int, list[int]]:
        self._next_index += 1
        self.links[ifname] = self._next_index
        return self._next_index, [self.a.fileno()] * queues

    def destroy_network(self, ifname: str, ifindex: int, fds: list[int], routes: list[str]) -> None:
        del self.links[ifname]

    def close(self) -> None:
        self.a.close()
        self.b.close()


class Rig(server_test.Rig):
    """A Server whose peers have the uids the test says (`client(uid)`), in the order they connect."""

    def __init__(self, path: str, monkeypatch: pytest.MonkeyPatch, **policy: Any) -> None:
        self.uids: list[int] = []
        monkeypatch.setattr(server_mod, "peer_of", lambda conn: ClientCreds(os.getpid(), self.uids.pop(0), 0))
        super().__init__(path, make_policy(controller_uids=[CONTROLLER], worker_uids=[WORKER, WORKER2, WORKER3],
                                           **policy), OneFdKernel())

    def client(self, uid: int, role: hm.Role | None = None) -> Client:  # type: ignore[override]
        self.uids.append(uid)
        c = super().client()
        if role is not None:
            assert isinstance(self.call(c, hm.Hello(role=role, protocol=hm.HELPER_PROTOCOL))[0], hm.Welcome)
        return c

    def open(self, c: Client) -> bool:
        """Neither a reply nor EOF waiting."""
        self.pump()
        return not select.select([c.sock], [], [], 0)[0]

    def audits(self, action: str, result: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r["action"] == action and result in (None, r["result"])]


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Iterator[Rig]:
    r = Rig(str(tmp_path / "helper.sock"), monkeypatch, max_networks=MAX_NETWORKS, max_queues=MAX_QUEUES,
            max_routes=MAX_ROUTES_PER_NETWORK)
    yield r
    r.close()


def test_the_largest_state_goes_through_every_request_type(rig: Rig) -> None:
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    seen: set[type] = {hm.Welcome}
    infos = [worst_info(i) for i in range(MAX_NETWORKS)]
    tickets: tuple[str, ...] = ()

    def call(msg: Any, expect: type, client: Client = c, fds: list[int] | None = None) -> Any:
        reply, got = rig.call(client, msg, fds)
        assert isinstance(reply, expect), reply  # decoded by the client: within the cap and the schema
        seen.add(type(reply))
        seqpacket.close_fds(got)
        return reply

    for info in infos:
        tickets = call(hm.CreateNetwork(name=info.name, ifname=info.ifname, mtu=MTU_MAX, addresses=info.addresses,
                                        queues=MAX_QUEUES, worker_uid=WORKER, adopt=False), hm.NetworkCreated).tickets
        assert len(call(hm.AddRoutes(name=info.name, routes=info.routes, metric=KILL_SWITCH_METRIC - 1, allow_default=False),
                        hm.RoutesChanged).routes) == MAX_ROUTES_PER_NETWORK
    failed = call(hm.CreateNetwork(name="z" * 32, ifname="l3p-zzzzzzzzzzz", mtu=MTU_MAX, addresses=infos[0].addresses,
                                   queues=MAX_QUEUES, worker_uid=WORKER, adopt=False), hm.Failed)
    assert failed.code is ErrorCode.LIMIT
    listed, after, pages = [], None, 0
    while True:
        page = call(hm.ListNetworks(after=after), hm.NetworkList)
        listed += page.networks
        pages += 1
        if not page.more:
            break
        after = page.networks[-1].name
    assert [n.name for n in listed] == sorted(i.name for i in infos) and pages > 1
    assert {len(n.routes) for n in listed} == {MAX_ROUTES_PER_NETWORK}
    last = infos[-1]
    assert call(hm.RemoveRoutes(name=last.name, routes=last.routes), hm.RoutesChanged).routes == ()
    call(hm.AddRoutes(name=last.name, routes=last.routes, metric=1, allow_default=False), hm.RoutesChanged)
    w = rig.client(WORKER, hm.Role.WORKER)
    reply, fds = rig.call(w, hm.ClaimQueue(ticket=tickets[-1]))
    assert isinstance(reply, hm.QueueGranted) and len(fds) == 1
    seen.add(hm.QueueGranted)
    seqpacket.close_fds(fds)
    a, b = socket.socketpair()
    call(hm.ProtectSocket(), hm.SocketProtected, client=w, fds=[a.fileno()])
    a.close()
    b.close()
    adopted = call(hm.CreateNetwork(name=last.name, ifname=last.ifname, mtu=MTU_MAX, addresses=last.addresses,
                                    queues=MAX_QUEUES, worker_uid=WORKER, adopt=True), hm.NetworkCreated)
    assert adopted.adopted and len(adopted.tickets) == MAX_QUEUES
    assert len(call(hm.DestroyNetwork(name=last.name), hm.NetworkDestroyed).routes_removed) == MAX_ROUTES_PER_NETWORK
    assert seen == set(hm.HELPER_REPLIES.types)
    assert len(rig.dispatcher.state.networks) == MAX_NETWORKS - 1


def test_a_bug_inside_a_request_is_answered_and_tears_nothing_down(rig: Rig, monkeypatch) -> None:
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    info = worst_info()
    assert isinstance(rig.call(c, hm.CreateNetwork(name="a", ifname="l3p-a", mtu=1280, addresses=(), queues=1,
                                                   worker_uid=WORKER, adopt=False))[0], hm.NetworkCreated)

    def boom(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(rig.kernel, "add_route", boom)
    reply, _ = rig.call(c, hm.AddRoutes(name="a", routes=("198.19.5.0/24",), metric=1, allow_default=False))
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.INTERNAL
    assert rig.audits("AddRoutes", "error")[-1]["error"] == "RuntimeError: a bug"
    # a reply that cannot be encoded (over the cap) is answered too
    monkeypatch.setattr(rig.dispatcher, "handle_list_networks",
                        lambda s, req: Outcome(hm.NetworkList(networks=(info,) * 2)))
    reply, _ = rig.call(c, hm.ListNetworks())
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.INTERNAL and "SchemaError" in reply.reason
    monkeypatch.undo()
    assert [n.name for n in rig.call(c, hm.ListNetworks())[0].networks] == ["a"]  # same connection, state kept
    assert rig.kernel.links == {"l3p-a": rig.dispatcher.state.networks["a"].ifindex}


def test_a_bug_outside_any_connection_does_not_leave_the_loop(rig: Rig, monkeypatch) -> None:
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)

    def boom() -> None:
        raise RuntimeError("a bug in the sweep")

    monkeypatch.setattr(rig.dispatcher, "flush_audit", boom)
    rig.server.step(0)  # does not raise: the caller's shutdown path would destroy every network
    assert rig.audits("step", "error")[-1]["error"] == "RuntimeError: a bug in the sweep"
    monkeypatch.undo()
    assert isinstance(rig.call(c, hm.ListNetworks())[0], hm.NetworkList)


def test_a_uid_outside_the_policy_is_refused_at_accept_and_summarised(rig: Rig) -> None:
    for _ in range(50):
        assert rig.closed(rig.client(OUTSIDER))
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    refused = rig.audits("accept", "refused")
    assert len(refused) == 1 and refused[0]["peer"].uid == OUTSIDER and "neither uid list" in refused[0]["reason"]
    rig.clock.advance(HELPER_AUDIT_WINDOW)
    rig.pump()
    summary = rig.audits("accept", "refused")[-1]
    assert summary["suppressed"] == 49 and summary["peer"].uid == OUTSIDER
    assert summary["summary"] == f"refused 49 more from uid {OUTSIDER} in the last {HELPER_AUDIT_WINDOW:g} s"
    assert isinstance(rig.call(c, hm.ListNetworks())[0], hm.NetworkList)
    for _ in range(3):  # a new window: the first line in full again
        rig.closed(rig.client(OUTSIDER))
    assert len(rig.audits("accept", "refused")) == 3


def test_a_uid_at_its_limit_loses_its_least_recently_active_session(rig: Rig) -> None:
    held = []
    for i in range(HELPER_MAX_SESSIONS_PER_UID):
        held.append(rig.client(WORKER, hm.Role.WORKER))
        rig.clock.advance(0.01)
    rig.call(held[0], hm.ClaimQueue(ticket="A" * 32))  # the first is now the most recently active
    new = rig.client(WORKER, hm.Role.WORKER)
    assert rig.closed(held[1]) and all(rig.open(c) for c in (held[0], *held[2:]))
    assert isinstance(rig.call(new, hm.ClaimQueue(ticket="B" * 32))[0], hm.Failed)  # served
    evicted = rig.audits("evict")
    assert len(evicted) == 1 and evicted[0]["peer"].uid == WORKER and evicted[0]["result"] == "evicted"


def test_workers_cannot_take_the_room_kept_for_the_controller(rig: Rig) -> None:
    for uid, count in ((WORKER, HELPER_MAX_SESSIONS_PER_UID),
                       (WORKER2, HELPER_MAX_SESSIONS - HELPER_CONTROLLER_RESERVED - HELPER_MAX_SESSIONS_PER_UID)):
        for _ in range(count):
            rig.client(uid, hm.Role.WORKER)
    assert rig.closed(rig.client(WORKER3))
    assert rig.audits("accept", "refused")[-1]["reason"] == "too many clients"
    controllers = [rig.client(CONTROLLER, hm.Role.CONTROLLER) for _ in range(HELPER_CONTROLLER_RESERVED)]
    assert all(isinstance(rig.call(c, hm.ListNetworks())[0], hm.NetworkList) for c in controllers)
    assert len(rig.server.sessions) == HELPER_MAX_SESSIONS
    # full: one more controller connection replaces the controller's least recently active one
    rig.clock.advance(1)
    assert isinstance(rig.call(controllers[0], hm.ListNetworks())[0], hm.NetworkList)
    late = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    assert rig.closed(controllers[1]) and isinstance(rig.call(late, hm.ListNetworks())[0], hm.NetworkList)


def test_sessions_time_out_after_hello_too(rig: Rig) -> None:
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    w = rig.client(WORKER, hm.Role.WORKER)
    rig.clock.advance(HELPER_IDLE_TIMEOUT_WORKER - 0.5)
    rig.pump()
    assert isinstance(rig.call(w, hm.ClaimQueue(ticket="A" * 32))[0], hm.Failed)  # a request restarts the clock
    rig.clock.advance(HELPER_IDLE_TIMEOUT_WORKER - 0.5)
    rig.pump()
    assert not rig.audits("idle")
    rig.clock.advance(1)
    assert rig.closed(w)
    idle = rig.audits("idle")
    assert len(idle) == 1 and idle[0]["peer"].uid == WORKER and idle[0]["result"] == "timeout"
    assert isinstance(rig.call(c, hm.ListNetworks())[0], hm.NetworkList)
    rig.clock.advance(HELPER_IDLE_TIMEOUT_CONTROLLER)
    assert rig.closed(c)


def test_a_close_that_blocks_does_not_block_the_loop(rig: Rig, monkeypatch) -> None:
    a, b = socket.socketpair()
    inode, release = os.fstat(a.fileno()).st_ino, threading.Event()
    real_close = os.close

    def close(fd: int) -> None:  # a close of this socket lingers, as a TCP socket's with SO_LINGER would
        try:
            lingers = os.fstat(fd).st_ino == inode
        except OSError:
            lingers = False
        if lingers:
            release.wait(10)
        real_close(fd)

    monkeypatch.setattr(seqpacket.os, "close", close)
    c = rig.client(CONTROLLER, hm.Role.CONTROLLER)
    bad = rig.client(WORKER)
    bad.send(hm.ListNetworks(), [a.fileno()])  # before Hello: a violation, the fd is closed at once
    timer = threading.Timer(4, release.set)
    timer.start()
    try:
        t0 = time.monotonic()
        assert rig.closed(bad)
        assert isinstance(rig.call(c, hm.ListNetworks())[0], hm.NetworkList)
        assert time.monotonic() - t0 < 2
        assert rig.server.closer.pending >= 1  # still stuck, on its own thread
    finally:
        release.set()
        timer.cancel()
        a.close()
        b.close()


def test_the_closer_starts_threads_as_needed_and_closes_inline_past_its_backlog(monkeypatch) -> None:
    release = threading.Event()
    fake, closed = {10**6 + i for i in range(4)}, []
    real_close = os.close

    def close(fd: int) -> None:
        if fd not in fake:
            return real_close(fd)
        if fd != 10**6 + 3:
            release.wait(10)
        closed.append(fd)

    monkeypatch.setattr(seqpacket.os, "close", close)
    closer = seqpacket.Closer(threads=2, backlog=3)
    closer.close([10**6, 10**6 + 1, 10**6 + 2])  # both threads stuck, one fd waits
    closer.close([10**6 + 3])  # past the backlog: closed by the caller
    assert closed == [10**6 + 3] and closer.pending == 3
    assert closer._threads == 2
    release.set()
    deadline = time.monotonic() + 5
    while closer.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(closed) == sorted(fake)
    closer.stop()
