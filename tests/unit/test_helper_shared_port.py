"""One UDP port per network, the helper's side (helper/dispatch.py `handle_protect_socket`): a shared-port
ProtectSocket steers only the queue its connection owns (claimed, or named by a fresh ticket), is audited, and
DestroyNetwork drops the network's steering. The kernel is the fake; the real map and program:
tests/privileged/test_shared_port.py."""

from __future__ import annotations

import os
import socket

from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc.errors import ErrorCode
from tests.unit.test_helper_dispatch import make_env  # noqa: F401  (fixture)


def _claim(env, tickets, queue):  # type: ignore[no-untyped-def]
    w = env.session(hm.Role.WORKER)
    granted = env.d.handle(w, hm.ClaimQueue(ticket=tickets[queue])).reply
    assert isinstance(granted, hm.QueueGranted) and granted.queue == queue
    return w


def test_a_worker_steers_only_the_queue_it_claimed(make_env) -> None:  # noqa: F811
    env = make_env()
    tickets = env.create(env.session(hm.Role.CONTROLLER), queues=3).tickets
    w1 = _claim(env, tickets, 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        refused = env.d.handle(w1, hm.ProtectSocket(network="n1", queue=2, shared=True), [udp.fileno()]).reply
        assert isinstance(refused, hm.Failed) and refused.code is ErrorCode.NOT_PERMITTED
        assert env.last()["result"] == "refused" and "steer" not in [c[0] for c in env.kernel.calls]
        other = env.d.handle(w1, hm.ProtectSocket(network="n2", queue=1, shared=True), [udp.fileno()]).reply
        assert isinstance(other, hm.Failed)
        unclaimed = env.session(hm.Role.WORKER)
        assert isinstance(env.d.handle(unclaimed, hm.ProtectSocket(network="n1", queue=0, shared=True),
                                       [udp.fileno()]).reply, hm.Failed)
        ok = env.d.handle(w1, hm.ProtectSocket(network="n1", queue=1, shared=True), [udp.fileno()]).reply
        assert isinstance(ok, hm.SocketProtected) and ok.steered
        assert env.kernel.steered == {"n1": {1: os.fstat(udp.fileno()).st_ino}}
        assert env.last()["action"] == "ProtectSocket"
        assert (env.last()["network"], env.last()["queue"], env.last()["steered"]) == ("n1", 1, True)
        plain = env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(), [udp.fileno()]).reply
        assert isinstance(plain, hm.SocketProtected) and not plain.steered  # per-queue: SO_MARK only
    finally:
        udp.close()


def test_a_fresh_ticket_lets_a_running_worker_register_again_without_touching_its_tun_queue(make_env) -> None:  # noqa: F811
    """After a helper restart: the controller's CreateNetwork(adopt=True) yields fresh tickets; a running worker
    registers its socket with one. The ticket is consumed; no queue fd changes hands, none is attached."""
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    env.create(c, queues=2)
    fresh = env.create(c, queues=2, adopt=True).tickets
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        w = env.session(hm.Role.WORKER)
        wrong = env.d.handle(w, hm.ProtectSocket(network="n1", queue=0, shared=True, ticket=fresh[1]),
                             [udp.fileno()]).reply
        assert isinstance(wrong, hm.Failed) and wrong.code is ErrorCode.NOT_PERMITTED  # ticket of queue 1, consumed
        out = env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(network="n1", queue=0, shared=True,
                                                                         ticket=fresh[0]), [udp.fileno()])
        assert isinstance(out.reply, hm.SocketProtected) and out.fd is None
        again = env.d.handle(env.session(hm.Role.WORKER), hm.ProtectSocket(network="n1", queue=0, shared=True,
                                                                           ticket=fresh[0]), [udp.fileno()]).reply
        assert isinstance(again, hm.Failed) and again.code is ErrorCode.NOT_FOUND  # single use
        assert not [call for call in env.kernel.calls if call[0] == "attach"]
    finally:
        udp.close()


def test_destroy_network_drops_its_steering(make_env) -> None:  # noqa: F811
    env = make_env()
    c = env.session(hm.Role.CONTROLLER)
    tickets = env.create(c, queues=2).tickets
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        env.d.handle(_claim(env, tickets, 0), hm.ProtectSocket(network="n1", queue=0, shared=True), [udp.fileno()])
    finally:
        udp.close()
    env.d.handle(c, hm.DestroyNetwork(name="n1"))
    assert ("unsteer", "n1") in env.kernel.calls and env.kernel.steered == {}

