"""Shared pieces for helper tests: a policy builder, a fake kernel, a client.

`FakeKernel` satisfies `l3ptp.helper.dispatch.Kernel` with real fds (a
SOCK_SEQPACKET socketpair per queue stands in for a TUN queue) so fd
bookkeeping is exercised without root. `Client` speaks the helper protocol
over any connected SOCK_SEQPACKET socket.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterable
from typing import Any

from l3ptp.helper.policy import Policy, parse_policy
from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_MESSAGE_MAX
from l3ptp.ipc.helper_messages import HELPER_PROTOCOL, HELPER_REPLIES, HELPER_REQUESTS, Hello, Role
from l3ptp.ipc.schema import Message

CONTROLLER_UID = 1000
WORKER_UID = 1001


def json_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """What each line holding JSON decodes to (a JSON log's records); other lines are skipped."""
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def make_policy(**overrides: Any) -> Policy:
    data: dict[str, Any] = {
        "controller_uids": [CONTROLLER_UID],
        "worker_uids": [WORKER_UID],
        "interface_prefix": "l3p-",
        "max_networks": 4,
        "max_queues": 4,
        "max_routes": 8,
        "allowed_prefixes": ["198.19.0.0/16", "fd00::/8"],
        "allow_default_route": True,
        "route_table": 100,  # a default route needs a table other than main
    }
    data.update(overrides)
    return parse_policy(data)


class FakeKernel:
    """Records calls; each queue fd is one end of a socketpair (peer kept here)."""

    def __init__(self) -> None:
        self.links: dict[str, int] = {}
        self.routes: set[tuple[int, str]] = set()
        self.protected: list[int] = []
        self.steered: dict[str, dict[int, int]] = {}  # network -> queue -> inode of the steered socket
        self.maps: dict[str, int] = {}  # network -> its stand-in steering map fd
        self.kept_from: dict[str, int | None] = {}  # network -> inode of the map fd the controller kept
        self.rules: list[str] = []
        self.kill_switch_routes: set[str] = set()
        self.aliases: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail_next: int | None = None  # errno to raise on the next mutating call
        self._peers: dict[int, socket.socket] = {}
        self._next_index = 10

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            code, self.fail_next = self.fail_next, None
            raise OSError(code, os.strerror(code))

    def create_network(self, ifname: str, mtu: int, addresses: tuple[str, ...], queues: int,
                       alias: str = "") -> tuple[int, list[int]]:
        self.calls.append(("create", ifname, mtu, addresses, queues))
        self._maybe_fail()
        if ifname in self.links:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.aliases[ifname] = alias
        self._next_index += 1
        self.links[ifname] = self._next_index
        fds = []
        for _ in range(queues):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds.append(a.detach())
            self._peers[fds[-1]] = b
        return self._next_index, fds

    def destroy_network(self, ifname: str, ifindex: int, fds: list[int], routes: list[str]) -> None:
        self.calls.append(("destroy", ifname, tuple(routes)))
        for r in routes:
            self.routes.discard((ifindex, r))
        for fd in fds:
            os.close(fd)
            self._peers.pop(fd).close()
        fds.clear()
        del self.links[ifname]

    def kill_switch(self, op: str, prefix: str) -> None:
        self.calls.append(("kill_switch", op, prefix))
        if op == "add":
            self._maybe_fail()
            self.kill_switch_routes.add(prefix)
        else:
            self.kill_switch_routes.discard(prefix)

    def attach(self, fd: int) -> None:
        self.calls.append(("attach", fd))

    def add_route(self, ifindex: int, prefix: str, metric: int) -> None:
        self.calls.append(("add_route", ifindex, prefix, metric))
        self._maybe_fail()
        self.routes.add((ifindex, prefix))

    def remove_route(self, ifindex: int, prefix: str) -> None:
        self.calls.append(("remove_route", ifindex, prefix))
        self.routes.discard((ifindex, prefix))

    def ensure_rules(self) -> list[str]:
        self.calls.append(("ensure_rules",))
        if self.rules:
            return []
        self.rules = ["inet 5157: fwmark 0x4c33 lookup 254"]
        return list(self.rules)

    def protect_socket(self, fd: int) -> None:
        self.calls.append(("protect", fd))
        self.protected.append(os.fstat(fd).st_ino)

    def steer_socket(self, network: str, queues: int, queue: int, fd: int) -> None:
        self.calls.append(("steer", network, queues, queue))
        self.steered.setdefault(network, {})[queue] = os.fstat(fd).st_ino

    def steer_network(self, network: str, queues: int, kept: int | None) -> tuple[int | None, str]:
        """A stand-in map fd per network (a pipe's read end); `kept_from` records the inode of the kept one."""
        self.calls.append(("steer_network", network, queues, kept is not None))
        if network in self.maps:
            return self.maps[network], "kept"
        r, w = os.pipe()
        os.close(w)
        self.maps[network] = r
        self.kept_from[network] = os.fstat(kept).st_ino if kept is not None else None
        return r, "adopted" if kept is not None else "new"

    def unsteer(self, network: str) -> None:
        self.calls.append(("unsteer", network))
        self.steered.pop(network, None)
        if network in self.maps:
            os.close(self.maps.pop(network))

    def close(self) -> None:
        """Close every queue fd still held (networks the test did not destroy)."""
        for fd, peer in self._peers.items():
            os.close(fd)
            peer.close()
        self._peers.clear()
        for fd in self.maps.values():
            os.close(fd)
        self.maps.clear()

    def peer_of(self, fd: int) -> socket.socket:
        return self._peers[fd]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Client:
    """A blocking helper client on a connected SOCK_SEQPACKET socket."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        return cls(sock)

    def send(self, msg: Message, fds: list[int] | None = None) -> None:
        seqpacket.send(self.sock, HELPER_REQUESTS.encode(msg), fds or ())

    def receive(self) -> tuple[Message | None, list[int]]:
        """The next reply and any fds; (None, []) when the helper closed the connection."""
        try:
            data, fds = seqpacket.recv(self.sock, HELPER_MESSAGE_MAX, 4)
        except seqpacket.PeerClosed:
            return None, []
        return HELPER_REPLIES.decode_untrusted(data), fds

    def request(self, msg: Message, fds: list[int] | None = None) -> tuple[Message | None, list[int]]:
        self.send(msg, fds)
        return self.receive()

    def hello(self, role: Role) -> Message | None:
        return self.request(Hello(role=role, protocol=HELPER_PROTOCOL))[0]

    def close(self) -> None:
        self.sock.close()


POLICY_TEMPLATE = """\
controller_uids = {controller_uids}
worker_uids = {worker_uids}
socket_group = {socket_group}
interface_prefix = "l3p-"
max_networks = 4
max_queues = 4
max_routes = 16
allowed_prefixes = ["198.19.0.0/16", "fd00::/8"]
allow_default_route = {allow_default_route}
route_protocol = 157
route_table = {route_table}
"""


class HelperProcess:
    """`l3ptp-helper` as a subprocess inside a test netns (`ip netns exec`)."""

    def __init__(self, netns: str, workdir: str, *, controller_uids: list[int], worker_uids: list[int],
                 allow_default_route: bool = False, socket_group: int = 65534, route_table: int = 254) -> None:
        import sys

        self.netns, self.workdir = netns, workdir
        os.chmod(workdir, 0o755)
        self.policy_path = os.path.join(workdir, "policy.toml")
        with open(self.policy_path, "w") as f:
            f.write(POLICY_TEMPLATE.format(controller_uids=controller_uids, worker_uids=worker_uids,
                                           socket_group=socket_group, route_table=route_table,
                                           allow_default_route=str(allow_default_route).lower()))
        os.chmod(self.policy_path, 0o644)
        self.socket_path = os.path.join(workdir, "helper.sock")
        self.argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "l3ptp.helper",
                     "--policy", self.policy_path, "--socket", self.socket_path]
        self.proc: Any = None
        self.generation = 0

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"helper-{self.generation}.log")

    def start(self, timeout: float = 15.0) -> None:
        import subprocess
        import time

        self.generation += 1
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        env = {**os.environ, "L3PTP_LOG_FORMAT": "json"}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"helper did not start: {open(self.log_path).read()}")
            time.sleep(0.05)

    def ready(self) -> bool:
        return any(r.get("event") == "helper_ready" for r in self.records())

    def records(self) -> list[dict[str, Any]]:
        with open(self.log_path) as f:
            return json_records(f)

    def audits(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == "audit"]

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def remove(self) -> None:
        """Stop, then delete the work directory and everything in it (policy, socket, logs)."""
        self.stop()
        for name in os.listdir(self.workdir):
            os.unlink(os.path.join(self.workdir, name))
        os.rmdir(self.workdir)

    def stop(self, sig: int = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=15)
        except Exception:
            os.kill(self.proc.pid, 9)
            return self.proc.wait(timeout=15)
