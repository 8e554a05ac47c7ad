"""Issue 18: a connector's `underlay.peer` may be a DNS name. The worker resolves it at start and again
at every reconnect (the name may point elsewhere by then); a name that does not resolve is counted, said
in last_error and retried with the backoff, and the worker keeps running. The resolver is the event
loop's, replaced here by a table (no DNS traffic leaves the test)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Any

import pytest

from l3ptp.ipc.types import PeerRole
from l3ptp.worker.__main__ import make_udp_socket
from tests.support.worker_fixtures import make_config, make_node, new_keys, udp_socket, wait_for

pytestmark = pytest.mark.timeout(60)

NAME = "peer.lab.test"


class Resolver:
    """getaddrinfo for NAME from a table; every other host as the loop would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str | None) -> None:
        self.address, self.calls, self._real = address, 0, loop.getaddrinfo
        loop.getaddrinfo = self  # type: ignore[method-assign]

    async def __call__(self, host: Any, port: Any, **kw: Any) -> Any:
        if host != NAME:
            return await self._real(host, port, **kw)
        self.calls += 1
        if self.address is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await self._real(self.address, port, type=socket.SOCK_DGRAM)


def listener_on(address: str, port: int, lkeys: Any, ckeys: Any) -> Any:
    """A listener on address:port (port 0: any free one)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, port))
    s.setblocking(False)
    cfg = make_config(PeerRole.LISTEN, own=lkeys, peer_fp=ckeys.fingerprint, port=s.getsockname()[1],
                      keepalive=0.2)
    return make_node(dataclasses.replace(cfg, local_address=address), s)


def connector_to_name(port: int, lkeys: Any, ckeys: Any, *, dual_stack: bool) -> Any:
    cfg = dataclasses.replace(make_config(PeerRole.CONNECT, own=ckeys, peer_fp=lkeys.fingerprint, port=port,
                                          keepalive=0.2), peer_address=NAME)
    sock = make_udp_socket(cfg) if dual_stack else udp_socket()
    sock.setblocking(False)
    return make_node(cfg, sock)


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4-socket", "dual-stack-socket"])
def test_a_peer_name_is_resolved_and_again_at_the_reconnect(dual_stack: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        resolver = Resolver(loop, "127.0.0.1")
        lkeys, ckeys = new_keys(), new_keys()
        first = listener_on("127.0.0.1", 0, lkeys, ckeys)
        port = first.sock.getsockname()[1]
        connector = connector_to_name(port, lkeys, ckeys, dual_stack=dual_stack)
        if dual_stack:
            assert connector.sock.family == socket.AF_INET6  # a name may resolve to either family
        first.start()
        connector.start()
        second = None
        try:
            ct = connector.tunnel
            assert await wait_for(lambda: ct.established and first.tunnel.established, 10)
            assert resolver.calls == 1 and ct.active is not None and ct.active.addr[0].endswith("127.0.0.1")
            # The name moves to another address; the old listener goes away.
            resolver.address = "127.0.0.2"
            second = listener_on("127.0.0.2", port, lkeys, ckeys)
            second.start()
            await first.stop()
            assert await wait_for(lambda: ct.established and second.tunnel.established, 20), ct.last_error
            assert resolver.calls >= 2 and ct.active.addr[0].endswith("127.0.0.2")
        finally:
            await connector.stop()
            for node in (first, second):
                if node is not None and node.task is not None and not node.task.done():
                    await node.stop()

    asyncio.run(asyncio.wait_for(main(), 45))


def test_a_name_that_does_not_resolve_is_counted_and_retried_and_then_connects() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        resolver = Resolver(loop, None)
        lkeys, ckeys = new_keys(), new_keys()
        listener = listener_on("127.0.0.1", 0, lkeys, ckeys)
        port = listener.sock.getsockname()[1]
        connector = connector_to_name(port, lkeys, ckeys, dual_stack=False)
        listener.start()
        connector.start()
        try:
            ct = connector.tunnel
            assert await wait_for(lambda: ct.peer_resolve_failures >= 2, 10)  # retried, not given up
            assert "cannot resolve peer 'peer.lab.test'" in ct.last_error and not connector.task.done()
            from l3ptp.worker.app import status_message

            assert status_message(connector.config, ct).counters["peer_resolve_failures"] >= 2
            resolver.address = "127.0.0.1"  # the name is published
            assert await wait_for(lambda: ct.established, 15), ct.last_error
        finally:
            await connector.stop()
            await listener.stop()

    asyncio.run(asyncio.wait_for(main(), 45))
