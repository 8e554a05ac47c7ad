"""The real server loop over real AF_UNIX SOCK_SEQPACKET sockets, with a fake kernel (no root)."""

from __future__ import annotations

import gc
import os
import random
import select
import socket
import struct
import time
from typing import Any

import pytest
import structlog

from l3ptp.helper import dispatch as dispatch_mod
from l3ptp.helper.dispatch import Dispatcher
from l3ptp.helper.server import MAX_FDS_PER_MESSAGE, Server, open_listener
from l3ptp.helper.state import HelperState
from l3ptp.ipc.constants import HELPER_HELLO_TIMEOUT, HELPER_MESSAGE_MAX
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.helper_messages import (
    HELPER_PROTOCOL,
    HELPER_REQUESTS,
    ClaimQueue,
    CreateNetwork,
    Failed,
    Hello,
    ListNetworks,
    NetworkCreated,
    NetworkList,
    QueueGranted,
    Role,
    Welcome,
)
from tests.support.helper_fixtures import Client, FakeClock, FakeKernel, make_policy

UID = os.getuid()


def _fd_count() -> int:
    """Open fds of this process, after a collection: a socket an earlier test left to the garbage collector must not
    close between two counts and be taken for one the helper closed."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class Rig:
    def __init__(self, path: str, policy: Any = None, kernel: Any = None) -> None:
        self.kernel = kernel or FakeKernel()
        self.records: list[dict[str, Any]] = []
        self.policy = policy or make_policy(controller_uids=[UID], worker_uids=[UID])
        self.clock = FakeClock()
        self.dispatcher = Dispatcher(self.policy, HelperState(), self.kernel, self._audit, self.clock)
        self.path = path
        self.server = Server(self.dispatcher, open_listener(path, None))
        self.clients: list[Client] = []

    def _audit(self, action: str, **fields: Any) -> None:
        self.records.append({"action": action, **fields})

    def client(self) -> Client:
        c = Client.connect(self.path)
        self.clients.append(c)
        self.pump()
        return c

    def pump(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self.server.step(0)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the closer threads have closed every fd given to them."""
        deadline = time.monotonic() + timeout
        while self.server.closer.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.server.closer.pending == 0

    def call(self, c: Client, msg: Any, fds: list[int] | None = None):
        c.send(msg, fds)
        self.pump()
        return c.receive()

    def closed(self, c: Client) -> bool:
        self.pump()
        try:
            reply, fds = c.receive()
        except (ConnectionResetError, BrokenPipeError):
            return True
        for fd in fds:
            os.close(fd)
        return reply is None

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.server.close()
        self.kernel.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(str(tmp_path / "helper.sock"))
    yield r
    r.close()


def _create(rig: Rig, c: Client, queues: int = 2) -> NetworkCreated:
    msg = CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=("198.19.1.1/24",), queues=queues,
                        worker_uid=UID, adopt=False)
    reply, _ = rig.call(c, msg)
    assert isinstance(reply, NetworkCreated)
    return reply


def test_socket_mode_and_full_flow_with_fd_passing(rig: Rig) -> None:
    assert os.stat(rig.path).st_mode & 0o777 == 0o660
    c = rig.client()
    assert isinstance(rig.call(c, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))[0], Welcome)
    created = _create(rig, c)
    net = rig.dispatcher.state.networks["n1"]
    for q, ticket in enumerate(created.tickets):
        w = rig.client()
        rig.call(w, Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL))
        reply, fds = rig.call(w, ClaimQueue(ticket=ticket))
        assert isinstance(reply, QueueGranted) and reply.queue == q and len(fds) == 1
        # the granted fd is the helper's queue: what the "kernel" sends arrives on it
        rig.kernel.peer_of(net.fds[q]).send(b"packet %d" % q)
        assert os.read(fds[0], 100) == b"packet %d" % q
        os.close(fds[0])
    w = rig.client()
    rig.call(w, Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL))
    reply, fds = rig.call(w, ClaimQueue(ticket=created.tickets[0]))
    assert isinstance(reply, Failed) and reply.code is ErrorCode.NOT_FOUND and fds == []


def test_oversized_message_closes_only_that_connection(rig: Rig) -> None:
    good = rig.client()
    rig.call(good, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
    bad = rig.client()
    bad.sock.send(b"\x00" * (HELPER_MESSAGE_MAX + 1))
    assert rig.closed(bad)
    assert rig.records[-1]["result"] == "violation" and rig.records[-1]["reason"] == "message over size cap"
    assert isinstance(rig.call(good, ListNetworks())[0], NetworkList)


def test_fuzzed_garbage_closes_connection_without_side_effects(rig: Rig) -> None:
    rng = random.Random(1234)
    good = rig.client()
    rig.call(good, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
    valid = HELPER_REQUESTS.encode(CreateNetwork(name="n1", ifname="l3p-n1", mtu=1280, addresses=(), queues=1,
                                                 worker_uid=UID, adopt=False))
    for i in range(150):
        c = rig.client()
        if i % 2:
            rig.call(c, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:  # mutate a valid request
            buf = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        c.sock.send(data)
        rig.pump()
        try:
            reply, fds = c.receive()
        except (ConnectionResetError, BrokenPipeError):
            reply, fds = None, []
        # a mutated request may still decode; then it is an ordinary reply
        assert reply is None or isinstance(reply, (Failed, NetworkCreated)), reply
        c.close()
        rig.clients.remove(c)
    assert all(r["result"] in ("violation", "refused", "ok") for r in rig.records)
    assert isinstance(rig.call(good, ListNetworks())[0], NetworkList)


def test_requests_after_violation_are_not_served(rig: Rig) -> None:
    c = rig.client()
    rig.call(c, Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL))
    c.send(ListNetworks())  # wrong role
    try:
        c.send(ListNetworks())
        c.send(Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert rig.closed(c)
    assert [r["result"] for r in rig.records].count("violation") == 1


def test_unexpected_fds_are_closed_by_the_helper(rig: Rig) -> None:
    c = rig.client()
    rig.call(c, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
    a, b = socket.socketpair()
    base = _fd_count()
    reply, _ = rig.call(c, ListNetworks(), [a.fileno(), b.fileno()])
    assert isinstance(reply, NetworkList)
    rig.settle()
    assert _fd_count() == base
    assert rig.records[-1]["result"] == "fds_discarded"
    a.close()
    b.close()


def test_too_many_fds_close_the_connection_and_every_fd(rig: Rig) -> None:
    c = rig.client()
    rig.call(c, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
    pairs = [socket.socketpair() for _ in range(MAX_FDS_PER_MESSAGE + 2)]
    try:
        base = _fd_count()
        c.send(ListNetworks(), [p[0].fileno() for p in pairs])
        assert rig.closed(c)
        # all of them received (none dropped inside recvmsg, which would close them on the loop), then refused
        assert rig.records[-1]["reason"] == f"{MAX_FDS_PER_MESSAGE + 2} fds, at most {MAX_FDS_PER_MESSAGE}"
        rig.settle()
        assert _fd_count() == base - 1  # every received fd closed, and the helper's end of `c`
    finally:  # also when it fails: never left to the garbage collector (a ResourceWarning in a later test)
        for a, b in pairs:
            a.close()
            b.close()


def test_audit_line_is_structured() -> None:
    from l3ptp.helper.dispatch import ClientCreds

    with structlog.testing.capture_logs() as logs:
        dispatch_mod.audit("ClaimQueue", peer=ClientCreds(pid=7, uid=1001, gid=1001), role=Role.WORKER, result="refused",
                        code="EXPIRED")
    assert logs == [{"event": "audit", "action": "ClaimQueue", "peer_uid": 1001, "peer_pid": 7, "role": "worker",
                     "result": "refused", "code": "EXPIRED", "log_level": "info"}]


def test_peer_credentials_struct() -> None:
    from l3ptp.helper.server import peer_of

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        peer = peer_of(a)
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        a.close()
        b.close()
    assert struct.calcsize("iII") == 12


def _open(c: Client) -> bool:
    """Nothing to read: neither a reply nor EOF."""
    return not select.select([c.sock], [], [], 0)[0]


def test_client_without_hello_is_dropped_after_the_timeout(rig: Rig) -> None:
    good = rig.client()
    rig.call(good, Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL))
    silent = rig.client()
    rig.dispatcher.clock.advance(HELPER_HELLO_TIMEOUT - 0.5)
    rig.pump()
    assert _open(silent) and _open(good)
    rig.dispatcher.clock.advance(1.0)
    assert rig.closed(silent)
    assert rig.records[-1]["action"] == "Hello" and rig.records[-1]["result"] == "violation"
    assert "no Hello" in rig.records[-1]["reason"] and rig.records[-1]["peer"].uid == UID
    # the client that did say Hello long ago keeps being served, and so do new ones
    assert isinstance(rig.call(good, ListNetworks())[0], NetworkList)
    late = rig.client()
    assert isinstance(rig.call(late, Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL))[0], Welcome)
