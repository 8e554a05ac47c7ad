"""The real helper under hostile local users: floods of connections and a received fd whose close lingers.

Attackers are forked children with other uids (a member of the socket's group that is not in the policy, or the
policy's worker uid); the test, as the policy's controller (root), measures that it is served within 2 s during the
attack. Every attack is bounded in time and its processes are killed by pid at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l3ptp.controller.helper_client import HelperClient, HelperError
from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_IDLE_TIMEOUT_WORKER, HELPER_MAX_SESSIONS
from lab.netns import ip, setns
from tests.support.helper_fixtures import Client, HelperProcess

pytestmark = pytest.mark.privileged

NOBODY, OUTSIDER, GROUP = 65534, 65533, 65534  # worker uid; a socket-group member not in the policy
SERVED_WITHIN = 2.0


@pytest.fixture
def helper(netns) -> Iterator[HelperProcess]:
    """The helper, with the running controller's own session open (as in production) during the attack."""
    workdir = tempfile.mkdtemp(prefix="l3ptp-hostile-")
    h = HelperProcess(netns, workdir, controller_uids=[0], worker_uids=[NOBODY], socket_group=GROUP)
    h.start()
    controller = Client.connect(h.socket_path)
    assert isinstance(controller.hello(hm.Role.CONTROLLER), hm.Welcome)
    yield h
    controller.close()
    h.remove()


class Attackers:
    """Forked children running `fn(ready)` as another uid; killed (by pid) when the test ends."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def start(self, fn: Callable[[Callable[[], None]], None], *, uid: int, netns: str | None = None,
              prepare: Callable[[], Any] | None = None, timeout: float = 20.0, lifetime: float = 25.0) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                signal.alarm(int(max(timeout, lifetime)) + 5)  # never outlives the test, whatever happens
                if netns:
                    setns(netns)
                prepared = prepare() if prepare else None
                os.setgroups([GROUP])
                os.setresgid(GROUP, GROUP, GROUP)
                os.setresuid(uid, uid, uid)
                fn((lambda: os.write(w, b"r")) if prepared is None else (lambda: os.write(w, b"r"), prepared))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self.pids.append(pid)
        try:
            assert select.select([r], [], [], timeout)[0] and os.read(r, 1) == b"r", "attacker did not get ready"
        finally:
            os.close(r)

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def attackers() -> Iterator[Attackers]:
    a = Attackers()
    yield a
    a.stop()


def _connect(path: str) -> socket.socket:
    return seqpacket.connect(path, 10)


def hold(path: str, count: int, until: float, hello: hm.Role | None = None) -> Callable[[Callable[[], None]], None]:
    """Keep `count` connections open (said Hello as `hello`, if given), reopening those the helper closes."""
    def run(ready: Callable[[], None]) -> None:
        conns: list[socket.socket] = []
        told = False
        while time.monotonic() < until:
            while len(conns) < count and time.monotonic() < until:
                with contextlib.suppress(OSError):
                    s = _connect(path)
                    if hello is not None:
                        s.settimeout(5)
                        Client(s).hello(hello)
                    conns.append(s)
            if not told:
                ready()
                told = True
            readable = select.select(conns, [], [], 0.2)[0]
            for s in readable:  # a reply we did not ask for cannot come: readable means closed
                conns.remove(s)
                s.close()
        time.sleep(60)  # then hold what is left, without a word, until killed
    return run


def served(path: str) -> float:
    """Seconds for the controller's client to connect, get Welcome and every network (inf if it did not)."""
    async def run() -> None:
        client = await HelperClient.connect(path, timeout=SERVED_WITHIN + 3)
        try:
            await client.list_networks()
        finally:
            client.close()

    t0 = time.monotonic()
    try:
        asyncio.run(run())
    except HelperError:
        return float("inf")
    return time.monotonic() - t0


def test_idle_connections_of_an_outsider_do_not_starve_the_controller(helper, attackers) -> None:
    attackers.start(hold(helper.socket_path, HELPER_MAX_SESSIONS - 1, time.monotonic() + 12), uid=OUTSIDER)
    time.sleep(0.5)
    times = [served(helper.socket_path) for _ in range(3)]
    assert max(times) < SERVED_WITHIN, times
    refused = [a for a in helper.audits() if a["action"] == "accept" and a["result"] == "refused"]
    assert refused and refused[0]["peer_uid"] == OUTSIDER and "neither uid list" in refused[0]["reason"]


def test_a_reconnect_flood_leaves_the_controller_served_and_the_audit_small(helper, attackers) -> None:
    until = time.monotonic() + 6
    for _ in range(3):
        attackers.start(hold(helper.socket_path, HELPER_MAX_SESSIONS, until), uid=OUTSIDER)
    times = []
    while time.monotonic() < until - 0.5:
        times.append(served(helper.socket_path))
        time.sleep(0.5)
    attackers.stop()
    assert len(times) >= 5 and max(times) < SERVED_WITHIN, times
    time.sleep(11)  # past the audit window: the summary line is written
    lines = [a for a in helper.audits() if a["action"] == "accept"]
    summaries = [a for a in lines if "summary" in a]
    assert summaries and all(a["peer_uid"] == OUTSIDER and a["suppressed"] > 0 for a in summaries)
    assert len(lines) <= 2 * len(summaries) + 2, len(lines)  # one in full and one summary per window
    assert sum(a["suppressed"] for a in summaries) > 100  # they were counted, not lost
    assert os.path.getsize(helper.log_path) < 64 * 1024


def test_worker_uid_holding_sessions_does_not_block_controller_or_a_new_worker(helper, attackers) -> None:
    c = Client.connect(helper.socket_path)
    c.hello(hm.Role.CONTROLLER)
    created, _ = c.request(hm.CreateNetwork(name="t", ifname="l3p-t", mtu=1280, addresses=("198.19.1.1/24",),
                                            queues=1, worker_uid=NOBODY, adopt=False))
    assert isinstance(created, hm.NetworkCreated)
    c.close()
    attackers.start(hold(helper.socket_path, HELPER_MAX_SESSIONS - 1, time.monotonic() + 8, hello=hm.Role.WORKER),
                    uid=NOBODY)
    time.sleep(0.5)
    assert max(served(helper.socket_path) for _ in range(3)) < SERVED_WITHIN

    def claim(ready: Callable[[], None]) -> None:
        t0 = time.monotonic()
        w = Client(_connect(helper.socket_path))
        w.hello(hm.Role.WORKER)
        reply, fds = w.request(hm.ClaimQueue(ticket=created.tickets[0]))
        if isinstance(reply, hm.QueueGranted) and len(fds) == 1 and time.monotonic() - t0 < SERVED_WITHIN:
            ready()

    attackers.start(claim, uid=NOBODY, timeout=SERVED_WITHIN + 1)  # "ready" only if served in time
    # the attacker's sessions, silent after its loop ends, are timed out
    deadline = time.monotonic() + 8 + HELPER_IDLE_TIMEOUT_WORKER + 5
    while time.monotonic() < deadline and not any(a["action"] == "idle" for a in helper.audits()):
        time.sleep(0.5)
    timeouts = [a for a in helper.audits() if a["action"] == "idle"]
    assert timeouts and timeouts[0]["result"] == "timeout" and timeouts[0]["peer_uid"] == NOBODY
    assert [a for a in helper.audits() if a["action"] == "evict"]  # the new ones took the place of old ones


def _lingering_tcp_socket(netns: str) -> Callable[[], Any]:
    """A TCP socket with SO_LINGER 20 s and unsent data (the listener never reads), made inside `netns`."""
    def prepare() -> Any:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lsock.bind(("198.18.0.1", 0))
        lsock.listen(1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(lsock.getsockname())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 20))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                s.send(b"x" * 65536)
        return lsock, s
    return prepare


@pytest.mark.parametrize("uid", [NOBODY, OUTSIDER])
def test_a_received_fd_whose_close_lingers_does_not_stall_the_helper(helper, attackers, netns, uid) -> None:
    ip("addr", "add", "198.18.0.1/32", "dev", "lo", netns=netns)
    assert served(helper.socket_path) < SERVED_WITHIN

    def send_fd(arg: Any) -> None:
        ready, (lsock, s) = arg
        # Park the lingering socket in flight inside a socketpair and send that: once this process has closed its
        # copies, the helper's close of what it got is the last reference to the TCP socket.
        x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        seqpacket.send(x, b"p", [s.fileno()])
        s.close()
        for _ in range(1000):  # an outsider races the helper closing its connection at accept
            with contextlib.suppress(OSError):
                conn = _connect(helper.socket_path)
                seqpacket.send(conn, b"\x91", [y.fileno()])  # before Hello; garbage: the helper closes at once
                break
        else:
            return  # never sent: not ready
        y.close()  # lingers here instead if the helper was quicker: then not ready, and the test tries again
        x.close()
        ready()
        time.sleep(30)  # keep the listener (and so the lingering connection) alive

    for _ in range(5):
        try:
            attackers.start(send_fd, uid=uid, netns=netns, prepare=_lingering_tcp_socket(netns), timeout=3,
                            lifetime=15)
            break
        except AssertionError:
            attackers.stop()
    else:
        pytest.fail("the helper closed its copy before the attacker every time")
    times = [served(helper.socket_path) for _ in range(3)]
    assert max(times) < SERVED_WITHIN, times


def test_the_largest_route_lists_are_listed_and_the_helper_lives(netns) -> None:
    """The issue's case: 4 networks of 256 routes, then ListNetworks (the controller's probe) — the helper used to
    exit over the reply cap and destroy every network."""
    workdir = tempfile.mkdtemp(prefix="l3ptp-hostile-")
    h = HelperProcess(netns, workdir, controller_uids=[0], worker_uids=[NOBODY], socket_group=GROUP)
    with open(h.policy_path) as f:
        text = f.read().replace("max_routes = 16", "max_routes = 256")
    with open(h.policy_path, "w") as f:
        f.write(text)
    h.start()
    try:
        c = Client.connect(h.socket_path)
        c.hello(hm.Role.CONTROLLER)
        for n in range(4):
            created, _ = c.request(hm.CreateNetwork(name=f"n{n}", ifname=f"l3p-n{n}", mtu=1280, queues=1,
                                                    addresses=(f"fd00:{n + 1}::1/64",), worker_uid=NOBODY, adopt=False))
            assert isinstance(created, hm.NetworkCreated), created
            routes = tuple(f"fd00:ffff:ffff:ffff:ffff:{0xf000 + n:x}:ffff:{0xf000 + r:x}/128" for r in range(256))
            added, _ = c.request(hm.AddRoutes(name=f"n{n}", routes=routes, metric=100, allow_default=False))
            assert isinstance(added, hm.RoutesChanged) and len(added.routes) == 256, added

        async def listed() -> list[int]:
            client = await HelperClient.connect(h.socket_path)
            try:
                return [len(info.routes) for info in await client.list_networks()]
            finally:
                client.close()

        assert asyncio.run(listed()) == [256] * 4
        assert h.proc.poll() is None
        assert isinstance(c.request(hm.ListNetworks())[0], hm.NetworkList)  # the old connection too
        assert len([x for x in ip("-j", "link", "show", netns=netns).split('"ifname"') if '"l3p-n' in x]) == 4
        c.close()
    finally:
        h.remove()
