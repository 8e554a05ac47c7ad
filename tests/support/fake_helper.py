"""An in-process fake of the privileged helper for controller tests.

`FakeHelper` keeps networks and routes in memory and answers the controller's
requests (Hello, CreateNetwork, AddRoutes, RemoveRoutes, DestroyNetwork,
ListNetworks) over a real AF_UNIX SOCK_SEQPACKET socket, decoding with
`HELPER_REQUESTS.decode_untrusted` like the real helper. Tests can:

* inspect `requests` (every decoded request, in order) and `networks`;
* make the next request of a type fail: ``fail_next[CreateNetwork] = (code, reason)``;
* send raw bytes instead of the reply: ``raw_next = b"..."``;
* go silent: ``mute = True``.

Use `socketpair()` for a connected pair, or `serve_path(path)` to listen.

With ``FakeHelper(tuns=True)`` it also serves real worker processes: each
created network gets one `FakeTun` per queue (``networks[name].tuns``, kept
across worker restarts like the real helper keeps its queue fds), every
ticket it hands out is remembered, and a connection that said
``Hello(role=worker)`` may ``ClaimQueue`` (answered with `QueueGranted` and a
dup of the queue's fake TUN fd as SCM_RIGHTS; a ticket works once) and
``ProtectSocket`` (answered with `SocketProtected`, the socket is not
touched). The test plays the kernel on ``tuns[q].host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
from typing import Any

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_MESSAGE_MAX, SOCKET_MARK_DEFAULT, TICKET_BYTES, TICKET_TTL
from l3ptp.ipc.errors import DecodeError, ErrorCode
from l3ptp.ipc import helper_messages as hm
from l3ptp.ipc.schema import Message

from .fake_tun import FakeTun


@dataclasses.dataclass
class FakeNetwork:
    spec: hm.CreateNetwork
    ifindex: int
    routes: list[str] = dataclasses.field(default_factory=list)
    tuns: list[FakeTun] = dataclasses.field(default_factory=list)

    def close(self) -> None:
        for tun in self.tuns:
            tun.close()

    def info(self) -> hm.NetworkInfo:
        s = self.spec
        return hm.NetworkInfo(
            name=s.name,
            ifname=s.ifname,
            ifindex=self.ifindex,
            mtu=s.mtu,
            queues=s.queues,
            addresses=s.addresses,
            routes=tuple(self.routes),
            worker_uid=s.worker_uid,
        )


class FakeHelper:
    def __init__(self, uid: int = 1000, *, tuns: bool = False) -> None:
        self.uid = uid
        self.with_tuns = tuns
        #: ticket -> (network, queue); a claimed ticket is removed.
        self.tickets: dict[str, tuple[str, int]] = {}
        self.claims: list[tuple[str, int]] = []
        self.networks: dict[str, FakeNetwork] = {}
        self.requests: list[Message] = []
        self.fail_next: dict[type[Message], tuple[ErrorCode, str]] = {}
        self.raw_next: bytes | None = None
        self.mute = False
        self.bad_frames = 0
        self.page_size = 4
        self._ifindex = 100
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None

    # ---- the request table -----------------------------------------------------

    def handle(self, req: Message) -> Message:
        self.requests.append(req)
        fail = self.fail_next.pop(type(req), None)
        if fail is not None:
            return hm.Failed(code=fail[0], reason=fail[1])
        if isinstance(req, hm.Hello):
            return hm.Welcome(role=req.role, protocol=hm.HELPER_PROTOCOL, uid=self.uid)
        if isinstance(req, hm.CreateNetwork):
            return self._create(req)
        if isinstance(req, hm.AddRoutes | hm.RemoveRoutes):
            net = self.networks.get(req.name)
            if net is None:
                return hm.Failed(code=ErrorCode.NOT_FOUND, reason=f"no network {req.name}")
            if isinstance(req, hm.AddRoutes):
                net.routes.extend(r for r in req.routes if r not in net.routes)
            else:
                net.routes[:] = [r for r in net.routes if r not in req.routes]
            return hm.RoutesChanged(name=req.name, routes=tuple(net.routes))
        if isinstance(req, hm.DestroyNetwork):
            net = self.networks.pop(req.name, None)
            if net is None:
                return hm.Failed(code=ErrorCode.NOT_FOUND, reason=f"no network {req.name}")
            net.close()
            self.tickets = {t: nq for t, nq in self.tickets.items() if nq[0] != req.name}
            return hm.NetworkDestroyed(name=req.name, routes_removed=tuple(net.routes))
        if isinstance(req, hm.ListNetworks):  # pages of `page_size` networks in name order, like the helper
            names = sorted(n for n in self.networks if req.after is None or n > req.after)
            page = names[: self.page_size]
            return hm.NetworkList(networks=tuple(self.networks[n].info() for n in page), more=len(page) < len(names))
        return hm.Failed(code=ErrorCode.NOT_PERMITTED, reason=f"{type(req).__name__} not allowed for the controller")

    def _create(self, req: hm.CreateNetwork) -> Message:
        old = self.networks.get(req.name)
        adopted = False
        if old is not None:
            if not (req.adopt and dataclasses.replace(old.spec, adopt=req.adopt, steer=req.steer) == req):
                return hm.Failed(code=ErrorCode.EXISTS, reason=f"network {req.name} exists")
            adopted = True
        else:
            self._ifindex += 1
            tuns = [FakeTun() for _ in range(req.queues)] if self.with_tuns else []
            self.networks[req.name] = FakeNetwork(req, self._ifindex, tuns=tuns)
        net = self.networks[req.name]
        tickets = tuple(secrets.token_urlsafe(TICKET_BYTES) for _ in range(req.queues))
        for queue, ticket in enumerate(tickets):
            self.tickets[ticket] = (req.name, queue)
        return hm.NetworkCreated(
            name=req.name,
            ifname=req.ifname,
            ifindex=net.ifindex,
            tickets=tickets,
            ticket_ttl=TICKET_TTL,
            adopted=adopted,
        )

    def handle_worker(self, req: Message) -> tuple[Message, list[int]]:
        """A request on a connection that said Hello(role=worker): reply and fds to pass."""
        self.requests.append(req)
        if isinstance(req, hm.Hello):
            return hm.Welcome(role=req.role, protocol=hm.HELPER_PROTOCOL, uid=self.uid), []
        if isinstance(req, hm.ClaimQueue):
            claim = self.tickets.pop(req.ticket, None)
            net = self.networks.get(claim[0]) if claim is not None else None
            if claim is None or net is None or not net.tuns:
                return hm.Failed(code=ErrorCode.EXPIRED, reason="unknown or used ticket"), []
            name, queue = claim
            self.claims.append(claim)
            granted = hm.QueueGranted(name=name, ifname=net.spec.ifname, queue=queue, mtu=net.spec.mtu)
            return granted, [net.tuns[queue].worker_fd]
        if isinstance(req, hm.ProtectSocket):
            return hm.SocketProtected(mark=SOCKET_MARK_DEFAULT), []
        return hm.Failed(code=ErrorCode.NOT_PERMITTED, reason=f"{type(req).__name__} not allowed for a worker"), []

    # ---- transport ---------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> None:
        """Answer requests on one connected socket until EOF."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        role: hm.Role | None = None
        try:
            while True:
                try:
                    data, got = await seqpacket.recv_async(loop, sock, HELPER_MESSAGE_MAX, 4)
                    seqpacket.close_fds(got)  # ProtectSocket's: not looked at
                    req = hm.HELPER_REQUESTS.decode_untrusted(data)
                except seqpacket.PeerClosed:
                    return
                except DecodeError:
                    self.bad_frames += 1
                    return  # like the real helper: a bad client is dropped
                if role is None and isinstance(req, hm.Hello):
                    role = req.role
                fds: list[int] = []
                if role is hm.Role.WORKER:
                    reply, fds = self.handle_worker(req)
                else:
                    reply = self.handle(req)
                if self.mute:
                    continue
                raw, self.raw_next = self.raw_next, None
                out = raw if raw is not None else hm.HELPER_REPLIES.encode(reply)
                if fds:
                    seqpacket.send(sock, out, fds)  # one small packet: never EAGAIN in practice
                else:
                    await loop.sock_sendall(sock, out)
        except (ConnectionError, OSError):
            return
        finally:
            sock.close()

    def socketpair(self) -> socket.socket:
        """Start serving one end of a new pair; return the client end."""
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._spawn(self.serve(server))
        return client

    async def serve_path(self, path: str) -> None:
        """Listen on `path` (accepting in the background) until `close()`."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        listener.listen(8)
        listener.setblocking(False)
        self._listener = listener
        self._spawn(self._accept_loop(listener))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                conn, _ = await loop.sock_accept(listener)
                self._spawn(self.serve(conn))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for net in self.networks.values():
            net.close()
