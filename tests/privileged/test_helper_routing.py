"""A default route through the tunnel, in its own table, does not swallow the tunnel's own UDP.

Namespace A runs the helper; its only way to the underlay peer 198.18.0.2 (namespace B) is a
default route over a veth (198.18.0.1/32, onlink). The tunnel then takes a default route too,
in route table 100, with wg-quick's three rules. A UDP socket the helper protected (SO_MARK)
still reaches B over the veth; an unmarked socket's packet to the very same address comes
out of the TUN queue instead.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import time
from typing import Any

import pytest

from l3ptp.ipc.helper_messages import (
    AddRoutes, ClaimQueue, CreateNetwork, NetworkCreated, ProtectSocket, QueueGranted, Role, RoutesChanged,
    SocketProtected,
)
from lab.netns import NetnsRegistry, ip, ip_json, run_as, setns
from tests.support.helper_fixtures import Client, HelperProcess

pytestmark = pytest.mark.privileged

TABLE = 100
PRIORITIES = (5157, 5158, 5159)


@pytest.fixture
def two_netns():
    reg = NetnsRegistry()
    a, b = reg.create(), reg.create()
    ip("link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", b, netns=a)
    ip("addr", "add", "198.18.0.1/32", "dev", "a0", netns=a)
    ip("link", "set", "a0", "up", netns=a)
    ip("route", "add", "default", "via", "198.18.0.2", "dev", "a0", "onlink", netns=a)
    ip("addr", "add", "198.18.0.2/32", "dev", "b0", netns=b)
    ip("link", "set", "b0", "up", netns=b)
    ip("route", "add", "198.18.0.1/32", "dev", "b0", netns=b)
    yield a, b
    reg.cleanup()


@pytest.fixture
def helper(two_netns):
    workdir = tempfile.mkdtemp(prefix="l3ptp-helper-")
    h = HelperProcess(two_netns[0], workdir, controller_uids=[0], worker_uids=[0], allow_default_route=True,
                      route_table=TABLE)
    h.start()
    yield h
    h.stop()
    shutil.rmtree(workdir)


def _our_rules(netns: str, family: str) -> list[dict[str, Any]]:
    return [r for r in ip_json(family, "rule", "show", netns=netns) if r.get("priority") in PRIORITIES]


def _tun_ipv4_to(fd: int, dst: str, timeout: float = 5.0) -> bytes:
    """The next IPv4 packet to `dst` read from a TUN queue (other chatter skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            packet = os.read(fd, 4096)
            if packet[0] >> 4 == 4 and socket.inet_ntoa(packet[16:20]) == dst:
                return packet
    raise AssertionError(f"no packet to {dst} came out of the TUN queue")


def test_marked_udp_bypasses_a_tunnel_default_route(helper, two_netns) -> None:
    a, b = two_netns
    c = Client.connect(helper.socket_path)
    c.hello(Role.CONTROLLER)
    created, _ = c.request(CreateNetwork(name="t", ifname="l3p-t", mtu=1280, addresses=("198.19.1.1/24",),
                                         queues=1, worker_uid=0, adopt=False))
    assert isinstance(created, NetworkCreated), created
    reply, _ = c.request(AddRoutes(name="t", routes=("0.0.0.0/0",), metric=10, allow_default=True))
    assert isinstance(reply, RoutesChanged), reply
    w = Client.connect(helper.socket_path)
    w.hello(Role.WORKER)
    granted, (queue_fd,) = w.request(ClaimQueue(ticket=created.tickets[0]))
    assert isinstance(granted, QueueGranted)

    # the tunnel's default route went to table 100; main still has only the veth default
    assert [r["dev"] for r in ip_json("route", "show", "table", str(TABLE), netns=a)
            if r["dst"] == "default" and "dev" in r] == ["l3p-t"]
    assert [r["dev"] for r in ip_json("route", "show", "table", "main", netns=a) if r["dst"] == "default"] == ["a0"]
    for family in ("-4", "-6"):
        rules = {r["priority"]: r for r in _our_rules(a, family)}
        assert sorted(rules) == list(PRIORITIES), rules
        assert rules[5157]["fwmark"] == "0x4c33" and rules[5157]["table"] == "main"
        assert rules[5158]["table"] == "main" and rules[5158]["suppress_prefixlen"] == 0
        assert rules[5159]["table"] == str(TABLE) and "not" in rules[5159] and "not" not in rules[5157]

    def prepare() -> socket.socket:
        setns(b)  # the receiver lives in B; sockets keep the namespace they were made in
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("198.18.0.2", 7000))
        setns(a)
        return rx

    def probe(rx: socket.socket) -> dict[str, Any]:
        rx.settimeout(5)
        worker = Client.connect(helper.socket_path)
        worker.hello(Role.WORKER)
        marked, plain = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        reply, _ = worker.request(ProtectSocket(), [marked.fileno()])
        assert isinstance(reply, SocketProtected), reply
        marked.sendto(b"marked", ("198.18.0.2", 7000))
        got, (src, _) = rx.recvfrom(100)
        plain.sendto(b"plain", ("198.18.0.2", 7000))
        packet = _tun_ipv4_to(queue_fd, "198.18.0.2")
        rx.settimeout(0.5)
        try:
            leaked = rx.recv(100)
        except TimeoutError:
            leaked = None
        # a second protect: the rules are idempotent
        reply2, _ = worker.request(ProtectSocket(), [plain.fileno()])
        return {"veth": [got.decode(), src], "tun": [socket.inet_ntoa(packet[12:16]), packet[28:].decode()],
                "leaked": leaked, "again": type(reply2).__name__}

    result = run_as(probe, netns=a, prepare=prepare)
    assert result == {"veth": ["marked", "198.18.0.1"], "tun": ["198.19.1.1", "plain"], "leaked": None,
                      "again": "SocketProtected"}
    assert [len(_our_rules(a, f)) for f in ("-4", "-6")] == [3, 3]
    added = [x for x in helper.audits() if x["action"] == "AddRules"]
    assert len(added) == 1 and added[0]["result"] == "ok" and len(added[0]["rules"]) == 6
    os.close(queue_fd)
    w.close()
    c.close()


def test_rules_are_removed_only_by_cleanup_and_only_ours(helper, two_netns) -> None:
    a, _ = two_netns
    # a rule of somebody else at one of our priorities, and one of ours at another priority
    ip("rule", "add", "priority", "5158", "lookup", "main", "protocol", "static", netns=a)
    ip("rule", "add", "priority", "5300", "fwmark", "0x4c33", "lookup", "main", "protocol", "157", netns=a)
    w = Client.connect(helper.socket_path)
    w.hello(Role.WORKER)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert isinstance(w.request(ProtectSocket(), [udp.fileno()])[0], SocketProtected)
    w.close()
    udp.close()
    assert len(_our_rules(a, "-4")) == 4  # ours (3) and the foreign one
    assert helper.stop() == 0
    assert len(_our_rules(a, "-4")) == 4  # an orderly stop keeps them (networks and their rules stay)
    helper.start()  # a start with no network to adopt drops them
    left = [(r["priority"], r.get("protocol")) for r in ip_json("-4", "rule", "show", netns=a)
            if 5157 <= r["priority"] <= 5300]
    assert left == [(5158, "static"), (5300, "157")]
    start = [x for x in helper.audits() if x["action"] == "reconcile" and x.get("when") == "start"]
    assert len(start) == 1 and len(start[0]["rules"]) == 6
