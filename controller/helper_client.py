"""The controller's client for the privileged helper (asyncio).

One AF_UNIX SOCK_SEQPACKET connection, one request in flight at a time
(a lock serialises callers), one message per packet (`l3ptp.ipc.seqpacket`;
the only fd either way is a network's steering map, with CreateNetwork and
NetworkCreated). Every reply goes through `HELPER_REPLIES.decode_untrusted`.

Stubs mirror the helper's request table (OpenSSH's ``mm_x``/``mm_answer_x``):
`create_network` sends `CreateNetwork` and expects `NetworkCreated`, and so on.
Each is `request_expect(request, ReplyType)`:

* the expected reply is returned;
* `Failed(code, reason)` raises `HelperFailed` with that `ErrorCode`; the
  connection stays usable (an ordinary error reply);
* anything else -- a timeout, EOF, an undecodable or unexpected reply --
  raises `HelperUnavailable` and closes the connection, since request and
  reply may no longer line up. The caller reconnects.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable, Sequence
from typing import TypeVar

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_TIMEOUT
from l3ptp.ipc.errors import DecodeError, ErrorCode
from l3ptp.ipc.helper_messages import (
    HELPER_PROTOCOL,
    HELPER_REPLIES,
    HELPER_REQUESTS,
    AddRoutes,
    CreateNetwork,
    DestroyNetwork,
    Failed,
    Hello,
    ListNetworks,
    NetworkCreated,
    NetworkDestroyed,
    NetworkInfo,
    NetworkList,
    RemoveRoutes,
    Role,
    RoutesChanged,
    Welcome,
)
from l3ptp.ipc.errors import HelperError, HelperFailed, HelperUnavailable
from l3ptp.ipc.schema import Message

__all__ = ["HelperClient", "HelperError", "HelperFailed", "HelperUnavailable"]

_R = TypeVar("_R", bound=Message)


class HelperClient:
    """A connected, greeted helper session. Use `connect` (or wrap a socket and `hello`)."""

    def __init__(self, sock: socket.socket, *, timeout: float = HELPER_TIMEOUT) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self.uid: int | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = HELPER_TIMEOUT) -> HelperClient:
        """Connect to the helper socket at `path` and say Hello as the controller."""
        loop = asyncio.get_running_loop()
        try:  # a blocking connect, on a thread: it waits its turn while others flood the helper's backlog
            sock = await loop.run_in_executor(None, seqpacket.connect, os.fspath(path), timeout)
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise HelperUnavailable(f"cannot connect to the helper at {os.fspath(path)}: {why}") from exc
        client = cls(sock, timeout=timeout)
        try:
            await client.hello()
        except HelperError:
            client.close()
            raise
        return client

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def request_expect(self, request: Message, reply_type: type[_R]) -> _R:
        """Send `request`, return the reply of `reply_type`; see the module docstring."""
        return (await self.request_fds(request, reply_type))[0]

    async def request_fds(self, request: Message, reply_type: type[_R], fds: Sequence[int] = (),
                          max_fds: int = 0) -> tuple[_R, list[int]]:
        """`request_expect` with `fds` sent along (not closed here) and the reply's at most `max_fds` fds
        (the caller's to close; closed here when the reply is not the one expected)."""
        data = HELPER_REQUESTS.encode(request)
        got: list[int] = []
        async with self._lock:
            sock = self._sock
            if sock is None:
                raise HelperUnavailable("not connected to the helper")
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(seqpacket.send_async(loop, sock, data, fds), self._timeout)
                recv = seqpacket.recv_async(loop, sock, HELPER_REPLIES.max_bytes, max_fds)
                packet, got = await asyncio.wait_for(recv, self._timeout)
                reply = HELPER_REPLIES.decode_untrusted(packet)
            except (OSError, TimeoutError) as exc:
                self.close()
                raise HelperUnavailable(f"helper {type(request).__name__}: {type(exc).__name__}") from exc
            except seqpacket.PeerClosed:
                self.close()
                raise HelperUnavailable("the helper closed the connection") from None
            except DecodeError as exc:  # a FramingError too: over the cap, or with ancillary data
                seqpacket.close_fds(got)
                self.close()
                raise HelperUnavailable(f"bad reply from the helper: {exc}") from None
        if not isinstance(reply, reply_type):
            seqpacket.close_fds(got)
            if isinstance(reply, Failed):
                raise HelperFailed(reply.code, reply.reason)
            self.close()
            raise HelperUnavailable(
                f"helper answered {type(request).__name__} with {type(reply).__name__},"
                f" expected {reply_type.__name__}"
            )
        return reply, got

    # ---- stubs, one per request ---------------------------------------------

    async def hello(self) -> Welcome:
        welcome = await self.request_expect(Hello(role=Role.CONTROLLER, protocol=HELPER_PROTOCOL), Welcome)
        if welcome.protocol != HELPER_PROTOCOL or welcome.role is not Role.CONTROLLER:
            self.close()
            raise HelperUnavailable(
                f"helper speaks protocol {welcome.protocol} as {welcome.role}, need {HELPER_PROTOCOL} as controller"
            )
        self.uid = welcome.uid
        return welcome

    async def create_network(
        self,
        *,
        name: str,
        ifname: str,
        mtu: int,
        addresses: Iterable[str],
        queues: int,
        worker_uid: int,
        adopt: bool = False,
        offload: bool = False,
        steer: bool = False,
        steering: int | None = None,
    ) -> tuple[NetworkCreated, int | None]:
        """NetworkCreated and, with `steer`, the network's steering map fd (the caller's to keep and close;
        None when the helper has none). `steering`: the map fd kept from an earlier helper, sent along."""
        req = CreateNetwork(
            name=name,
            ifname=ifname,
            mtu=mtu,
            addresses=tuple(addresses),
            queues=queues,
            worker_uid=worker_uid,
            adopt=adopt,
            offload=offload,
            steer=steer,
        )
        sent = [steering] if steer and steering is not None else []
        reply, fds = await self.request_fds(req, NetworkCreated, sent, max_fds=1 if steer else 0)
        if reply.steering != bool(fds):
            seqpacket.close_fds(fds)
            self.close()
            raise HelperUnavailable(f"helper answered CreateNetwork with steering={reply.steering} and {len(fds)} fds")
        return reply, (fds[0] if fds else None)

    async def add_routes(
        self, name: str, routes: Iterable[str], *, metric: int, allow_default: bool
    ) -> RoutesChanged:
        req = AddRoutes(name=name, routes=tuple(routes), metric=metric, allow_default=allow_default)
        return await self.request_expect(req, RoutesChanged)

    async def remove_routes(self, name: str, routes: Iterable[str]) -> RoutesChanged:
        return await self.request_expect(RemoveRoutes(name=name, routes=tuple(routes)), RoutesChanged)

    async def destroy_network(self, name: str) -> NetworkDestroyed:
        return await self.request_expect(DestroyNetwork(name=name), NetworkDestroyed)

    async def list_networks(self) -> tuple[NetworkInfo, ...]:
        """Every network, page by page (a page holds what fits in one reply); names must keep increasing."""
        out: list[NetworkInfo] = []
        after: str | None = None
        while True:
            page = await self.request_expect(ListNetworks(after=after), NetworkList)
            if any(after is not None and n.name <= after for n in page.networks) or (page.more and not page.networks):
                self.close()
                raise HelperUnavailable("helper answered ListNetworks with pages out of order")
            out.extend(page.networks)
            if not page.more:
                return tuple(out)
            after = page.networks[-1].name
