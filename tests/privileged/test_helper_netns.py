"""The real helper in a fresh network namespace per test, with real multi-queue TUN devices."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any

import pytest
import pytun

from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc import helper_messages as hm
from lab.netns import ip, ip_json, run_as
from tests.support.helper_fixtures import Client, HelperProcess
from tests.support.packets import ipv4_udp

pytestmark = pytest.mark.privileged

NOBODY = 65534
PROTO = 157
TUNSETIFF = 0x400454CA


@pytest.fixture
def helper(netns):
    workdir = tempfile.mkdtemp(prefix="l3ptp-helper-")
    h = HelperProcess(netns, workdir, controller_uids=[0, NOBODY], worker_uids=[0, NOBODY])
    h.start()
    yield h
    h.stop()
    for name in os.listdir(workdir):
        os.unlink(os.path.join(workdir, name))
    os.rmdir(workdir)


def _create(ifname: str = "l3p-t", queues: int = 2, worker_uid: int = NOBODY, name: str = "t") -> hm.CreateNetwork:
    return hm.CreateNetwork(name=name, ifname=ifname, mtu=1280, addresses=("198.19.1.1/24", "fd00:1::1/64"),
                         queues=queues, worker_uid=worker_uid, adopt=False)


def _controller(h: HelperProcess) -> Client:
    c = Client.connect(h.socket_path)
    assert c.hello(hm.Role.CONTROLLER) is not None
    return c


def _claim(h: HelperProcess, ticket: str) -> tuple[Any, list[int]]:
    w = Client.connect(h.socket_path)
    try:
        w.hello(hm.Role.WORKER)
        return w.request(hm.ClaimQueue(ticket=ticket))
    finally:
        w.close()


def _read_ipv4_reply(fds: list[int], timeout: float = 5.0) -> bytes:
    """The UDP payload of the next IPv4 packet to 198.19.1.2 on any queue (IPv6 chatter such as
    router solicitations from the fd00:: address is skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(fds, [], [], left)
        for fd in ready:
            packet = os.read(fd, 2000)
            if packet[0] >> 4 == 4 and socket.inet_ntoa(packet[16:20]) == "198.19.1.2":
                return packet[28:]
    raise AssertionError("no IPv4 reply came out of any queue")


def _other_link(netns: str) -> None:
    """A link that is not ours (veth pair d0/d1), with a route of another protocol."""
    ip("link", "add", "d0", "type", "veth", "peer", "name", "d1", netns=netns)
    ip("link", "set", "d0", "up", netns=netns)
    ip("link", "set", "d1", "up", netns=netns)


def _routes(netns: str, family: str = "-4", table: str = "main") -> list[dict[str, Any]]:
    return ip_json(family, "route", "show", "table", table, netns=netns)


def test_non_root_client_gets_queues_and_traffic_flows_both_ways(helper, netns) -> None:
    def client(tun_fds: tuple[int, int]) -> dict[str, Any]:
        tun_fd, open_fd = tun_fds
        assert os.getuid() == NOBODY
        c = Client.connect(helper.socket_path)
        c.hello(hm.Role.CONTROLLER)
        created, _ = c.request(_create())
        assert isinstance(created, hm.NetworkCreated), created
        fds = []
        for q, ticket in enumerate(created.tickets):
            reply, got = _claim(helper, ticket)
            assert isinstance(reply, hm.QueueGranted) and reply.queue == q and len(got) == 1, reply
            fds.append(got[0])
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("198.19.1.1", 5000))
        udp.settimeout(5)
        replies = []
        for q, fd in enumerate(fds):
            os.write(fd, ipv4_udp("198.19.1.2", "198.19.1.1", b"hello %d" % q, sport=4000 + q, dport=5000))
            data, addr = udp.recvfrom(100)
            assert (data, addr) == (b"hello %d" % q, ("198.19.1.2", 4000 + q))
            udp.sendto(b"reply %d" % q, addr)
            replies.append(_read_ipv4_reply(fds).decode())
        # another uid (no CAP_NET_ADMIN) cannot attach a queue to our device, even holding
        # an open /dev/net/tun
        ifr = struct.pack("16sH", b"l3p-t", pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE)
        try:
            fcntl.ioctl(tun_fd, TUNSETIFF, ifr)
            attach = "attached"
        except OSError as exc:
            attach = errno.errorcode[exc.errno]
        # control: the same attach onto an ownerless multi-queue device succeeds
        fcntl.ioctl(open_fd, TUNSETIFF, struct.pack("16sH", b"x-open", struct.unpack("16sH", ifr)[1]))
        return {"replies": replies, "attach": attach}

    ip("tuntap", "add", "dev", "x-open", "mode", "tun", "multi_queue", netns=netns)
    # /dev/net/tun is mode 0600 here, and an open tun file belongs to the netns it was opened
    # in: open two inside the namespace, as root, before the uid drop.
    result = run_as(client, netns=netns, uid=NOBODY,
                    prepare=lambda: (os.open("/dev/net/tun", os.O_RDWR), os.open("/dev/net/tun", os.O_RDWR)))
    assert result == {"replies": ["reply 0", "reply 1"], "attach": "EPERM"}
    claims = [a for a in helper.audits() if a["action"] == "ClaimQueue"]
    assert [(a["peer_uid"], a["result"], a["queue"]) for a in claims] == [(NOBODY, "ok", 0), (NOBODY, "ok", 1)]
    # the network survived the client going away (fail-closed): link still there
    assert ip_json("link", "show", "l3p-t", netns=netns)[0]["ifname"] == "l3p-t"


def test_wrong_uid_is_refused_and_audited(helper, netns) -> None:
    def client() -> Any:
        c = Client.connect(helper.socket_path)
        reply, _ = c.request(hm.Hello(role=hm.Role.CONTROLLER, protocol=hm.HELPER_PROTOCOL))
        return reply is None

    h2 = helper
    h2.stop()
    # restart with a policy that does not list nobody as controller
    h3 = HelperProcess(netns, h2.workdir, controller_uids=[0], worker_uids=[NOBODY])
    h3.start()
    try:
        assert run_as(client, uid=NOBODY) is True
        v = [a for a in h3.audits() if a["result"] == "violation"]
        assert v and v[-1]["peer_uid"] == NOBODY and v[-1]["action"] == "Hello"
        assert ip_json("link", "show", netns=netns) and not [
            link for link in ip_json("link", "show", netns=netns) if link["ifname"].startswith("l3p-")
        ]
    finally:
        h3.stop()


def test_tickets_single_use_expired_and_bound_to_uid(helper, netns) -> None:
    c = _controller(helper)
    created, _ = c.request(_create(worker_uid=0))
    reply, fds = _claim(helper, created.tickets[0])
    assert isinstance(reply, hm.QueueGranted) and len(fds) == 1
    os.close(fds[0])
    reply, fds = _claim(helper, created.tickets[0])
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.NOT_FOUND and fds == []
    # ticket for uid 0 presented by nobody
    assert run_as(lambda: _claim(helper, created.tickets[1])[0].code.name, uid=NOBODY) == "NOT_PERMITTED"
    results = [(a["action"], a["result"], a.get("code")) for a in helper.audits() if a["action"] == "ClaimQueue"]
    assert results == [("ClaimQueue", "ok", None), ("ClaimQueue", "refused", "NOT_FOUND"),
                       ("ClaimQueue", "refused", "NOT_PERMITTED")]
    c.close()


def test_existing_interface_is_not_adopted(helper, netns) -> None:
    ip("tuntap", "add", "dev", "l3p-busy", "mode", "tun", "multi_queue", netns=netns)
    c = _controller(helper)
    reply, _ = c.request(_create(ifname="l3p-busy"))
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.BUSY
    link = ip_json("addr", "show", "l3p-busy", netns=netns)[0]
    assert link["addr_info"] == [] and link["mtu"] == 1500 and "UP" not in link["flags"]
    assert [a["result"] for a in helper.audits() if a["action"] == "CreateNetwork"] == ["refused"]
    assert isinstance(c.request(hm.ListNetworks())[0], hm.NetworkList)
    c.close()


def test_routes_policy_and_ownership(helper, netns) -> None:
    _other_link(netns)
    ip("route", "add", "198.19.20.0/24", "dev", "d0", "proto", "static", netns=netns)
    c = _controller(helper)
    c.request(_create())
    ok, _ = c.request(hm.AddRoutes(name="t", routes=("198.19.10.0/24", "fd00:10::/64"), metric=50, allow_default=False))
    assert isinstance(ok, hm.RoutesChanged)
    ours = [r for r in _routes(netns) if r["dst"] == "198.19.10.0/24"]
    assert ours and ours[0]["protocol"] in ("157", PROTO) and ours[0]["dev"] == "l3p-t"
    assert any(r["dst"] == "fd00:10::/64" for r in _routes(netns, "-6"))
    before = _routes(netns)
    for routes, allow in [(("10.0.0.0/8",), False), (("0.0.0.0/0",), True), (("198.18.0.0/24",), False)]:
        reply, _ = c.request(hm.AddRoutes(name="t", routes=routes, metric=50, allow_default=allow))
        assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.OUT_OF_POLICY
    reply, _ = c.request(hm.RemoveRoutes(name="t", routes=("198.19.20.0/24",)))
    assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.NOT_FOUND
    assert _routes(netns) == before
    refusals = [a for a in helper.audits() if a["result"] == "refused"]
    assert len(refusals) == 4
    destroyed, _ = c.request(hm.DestroyNetwork(name="t"))
    assert isinstance(destroyed, hm.NetworkDestroyed)
    assert set(destroyed.routes_removed) == {"198.19.10.0/24", "fd00:10::/64"}
    assert not [r for r in _routes(netns) if r.get("dev") == "l3p-t"]
    assert [r["dst"] for r in _routes(netns) if r.get("dev") == "d0"] == ["198.19.20.0/24"]
    assert ip("link", "show", "l3p-t", netns=netns, check=False) == ""
    c.close()


def test_default_route_needs_policy_permission(netns) -> None:
    workdir = tempfile.mkdtemp(prefix="l3ptp-helper-")
    h = HelperProcess(netns, workdir, controller_uids=[0], worker_uids=[0], allow_default_route=True, route_table=100)
    h.start()
    try:
        c = _controller(h)
        c.request(_create(worker_uid=0))
        reply, _ = c.request(hm.AddRoutes(name="t", routes=("0.0.0.0/0",), metric=50, allow_default=False))
        assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.OUT_OF_POLICY
        reply, _ = c.request(hm.AddRoutes(name="t", routes=("0.0.0.0/0",), metric=50, allow_default=True))
        assert isinstance(reply, hm.RoutesChanged)
        defaults = [(r.get("dev"), r.get("type")) for r in _routes(netns, table="100") if r["dst"] == "default"]
        assert sorted(defaults, key=str) == [("l3p-t", None), (None, "unreachable")]  # and its kill switch
        assert not [r for r in _routes(netns) if r["dst"] == "default"]  # never in main
        c.close()
        # An orderly stop keeps the network (fail-closed); only --cleanup removes it, and then the rules too.
        assert h.stop() == 0
        assert len([r for r in _routes(netns, table="100") if r["dst"] == "default"]) == 2
        assert subprocess.run([*h.argv, "--cleanup"], capture_output=True, timeout=60).returncode == 0
    finally:
        h.stop()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    assert not [r for r in _routes(netns, table="100") if r["dst"] == "default"]
    assert "l3p-t" not in ip("link", "show", netns=netns)
    assert not [r for r in ip_json("rule", "show", netns=netns) if r.get("priority") in (5157, 5158, 5159)]


def test_protect_socket_marks_and_installs_rules(helper, netns) -> None:
    w = Client.connect(helper.socket_path)
    w.hello(hm.Role.WORKER)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reply, _ = w.request(hm.ProtectSocket(), [udp.fileno()])
        assert isinstance(reply, hm.SocketProtected)
        assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == reply.mark
        reply, _ = w.request(hm.ProtectSocket(), [tcp.fileno()])
        assert isinstance(reply, hm.Failed) and reply.code is ErrorCode.BAD_REQUEST
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        for family in ("-4", "-6"):
            rules = [r for r in ip_json(family, "rule", "show", netns=netns) if r.get("priority") == 5157]
            assert len(rules) == 1 and rules[0]["table"] == "main" and rules[0]["fwmark"] == hex(reply and 0x4C33)
    finally:
        udp.close()
        tcp.close()
        w.close()


def _unreachable(netns: str) -> set[str]:
    return {r["dst"] for f in ("-4", "-6") for r in _routes(netns, f)
            if r.get("type") == "unreachable" and r.get("protocol") == str(PROTO)}


def test_kill_9_then_restart_adopts_the_network_its_routes_and_kill_switch(helper, netns) -> None:
    _other_link(netns)
    ip("route", "add", "198.19.20.0/24", "dev", "d0", "proto", "static", netns=netns)
    ip("tuntap", "add", "dev", "l3p-junk", "mode", "tun", netns=netns)  # ours by name, named by no alias
    c = _controller(helper)
    created, _ = c.request(_create(worker_uid=0))
    c.request(hm.AddRoutes(name="t", routes=("198.19.10.0/24", "fd00:10::/64"), metric=50, allow_default=False))
    guarded = {"198.19.1.0/24", "fd00:1::/64", "198.19.10.0/24", "fd00:10::/64"}
    assert _unreachable(netns) == guarded
    _, fds = _claim(helper, created.tickets[0])  # a "worker" holds queue 0 across the restart
    c.close()
    helper.stop(9)
    helper.start()
    start = [a for a in helper.audits() if a["action"] == "reconcile"][0]
    assert start["adopted"] == ["t"] and start["links"] == ["l3p-junk"] and start["kill_switch_removed"] == []
    assert "l3p-t" in ip("link", "show", netns=netns) and "l3p-junk" not in ip("link", "show", netns=netns)
    assert {r["dst"] for r in _routes(netns) if r.get("dev") == "l3p-t" and r.get("protocol") == str(PROTO)} \
        == {"198.19.10.0/24"}
    assert _unreachable(netns) == guarded
    assert [r["dst"] for r in _routes(netns) if r.get("dev") == "d0"] == ["198.19.20.0/24"]
    # The adopted network answers like before: same spec adopts, the worker's queue still carries packets.
    c = _controller(helper)
    (info,) = c.request(hm.ListNetworks())[0].networks
    assert (info.name, info.ifname, info.queues, set(info.routes)) == ("t", "l3p-t", 2, {"198.19.10.0/24",
                                                                                        "fd00:10::/64"})
    again, _ = c.request(dataclasses.replace(_create(worker_uid=0), adopt=True))
    assert isinstance(again, hm.NetworkCreated) and again.adopted, again
    _, fds1 = _claim(helper, again.tickets[1])

    def send() -> None:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for port in range(9000, 9032):  # flows spread over the attached queues: the old worker's and the claimed
            tx.sendto(b"x", ("198.19.1.2", port))
        tx.close()

    run_as(send, netns=netns)
    # All 32 arrive: the adopted queues the helper holds are detached, none swallows a flow.
    assert [_read_ipv4_reply(fds + fds1) for _ in range(32)] == [b"x"] * 32
    # An explicit destroy removes the kill switch too.
    assert isinstance(c.request(hm.DestroyNetwork(name="t"))[0], hm.NetworkDestroyed)
    assert _unreachable(netns) == set() and "l3p-t" not in ip("link", "show", netns=netns)
    for fd in fds + fds1:
        os.close(fd)
    c.close()


def test_fd_count_returns_to_baseline_after_50_cycles(helper, netns) -> None:
    c = _controller(helper)
    c.request(hm.ListNetworks())
    baseline = helper.fd_count()
    for i in range(50):
        created, _ = c.request(_create(worker_uid=0, queues=2))
        assert isinstance(created, hm.NetworkCreated), created
        for ticket in created.tickets:
            _, fds = _claim(helper, ticket)
            for fd in fds:
                os.close(fd)
        destroyed, _ = c.request(hm.DestroyNetwork(name="t"))
        assert isinstance(destroyed, hm.NetworkDestroyed)
    c.request(hm.ListNetworks())  # the helper has processed every earlier disconnect by now
    deadline = time.monotonic() + 5
    while helper.fd_count() != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helper.fd_count() == baseline
    c.close()


def test_ipv6_address_is_usable_at_once(helper, netns) -> None:
    c = _controller(helper)
    assert isinstance(c.request(_create(worker_uid=0))[0], hm.NetworkCreated)
    (v6,) = [a for a in ip_json("-6", "addr", "show", "dev", "l3p-t", netns=netns)[0]["addr_info"]
             if a["local"] == "fd00:1::1"]
    # added with IFA_F_NODAD: never "tentative", so a worker may bind it right away
    assert v6.get("nodad") is True and "tentative" not in v6, v6

    def bind() -> bool:  # a tentative address would fail with EADDRNOTAVAIL
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("fd00:1::1", 0))
        return True

    assert run_as(bind, netns=netns) is True
    c.close()


def test_no_ipv6_link_local_address_on_the_tunnel(helper, netns) -> None:
    """addr_gen_mode none: no fe80:: address, so the kernel sends no RS/MLD from it into the tunnel."""
    c = _controller(helper)
    assert isinstance(c.request(_create(worker_uid=0))[0], hm.NetworkCreated)
    addrs = [a["local"] for a in ip_json("-6", "addr", "show", "dev", "l3p-t", netns=netns)[0]["addr_info"]]
    assert addrs == ["fd00:1::1"], addrs
    link = ip_json("-d", "link", "show", "dev", "l3p-t", netns=netns)[0]
    assert link.get("inet6_addr_gen_mode") == "none", link.get("inet6_addr_gen_mode")
    c.close()
