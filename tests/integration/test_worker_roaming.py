"""Issue 18: a NAT rebinding of the connector keeps its session. A UDP NAT in the test sits between the
two workers; mid-traffic it moves the connector's flow to a new outside port. The listener follows by
connection ID: no new handshake, traffic continues both ways within 1 s, the move is counted."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.types import PeerRole
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import ENGINES, make_config, make_node, new_keys, udp_socket, wait_for

pytestmark = pytest.mark.timeout(60)


class Nat:
    """The connector sends to `inside`; the NAT forwards from its current outside socket and brings the
    listener's answers back. `rebind()` gives the flow a new outside port; the old mapping is gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: tuple[str, int]) -> None:
        self.loop, self.listener = loop, listener
        self.inside = udp_socket()
        self.client: Any = None
        self.outside = self._open()
        loop.add_reader(self.inside.fileno(), self._up)

    def _open(self) -> socket.socket:
        s = udp_socket()
        self.loop.add_reader(s.fileno(), self._down, s)
        return s

    def _up(self) -> None:
        data, self.client = self.inside.recvfrom(65535)
        self.outside.sendto(data, self.listener)

    def _down(self, s: socket.socket) -> None:
        data, _ = s.recvfrom(65535)
        if s is self.outside and self.client is not None:
            self.inside.sendto(data, self.client)

    def rebind(self) -> tuple[str, int]:
        old, self.outside = self.outside, self._open()
        self.loop.remove_reader(old.fileno())
        old.close()
        return self.outside.getsockname()

    def close(self) -> None:
        for s in (self.inside, self.outside):
            self.loop.remove_reader(s.fileno())
            s.close()


@pytest.mark.parametrize("queue", [(0, 1), (1, 3)], ids=["one-queue", "queue-1-of-3-shared-port"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_nat_rebinding_keeps_the_session_and_traffic_resumes_within_a_second(engine: Engine,
                                                                               queue: tuple[int, int]) -> None:
    """With queue 1 of 3 on a shared port the CIDs are pinned to the queue and the listener drops datagrams
    of other queues (worker/steering.py): the moved peer's packets still carry its queue's CID."""
    pin = {"queue": queue[0], "queues": queue[1]}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lkeys, ckeys = new_keys(), new_keys()
        lsock = udp_socket()
        port = lsock.getsockname()[1]
        nat = Nat(loop, ("127.0.0.1", port))
        lcfg = make_config(PeerRole.LISTEN, own=lkeys, peer_fp=ckeys.fingerprint, port=port, engine=engine, **pin)
        ccfg = make_config(PeerRole.CONNECT, own=ckeys, peer_fp=lkeys.fingerprint,
                           port=nat.inside.getsockname()[1], engine=engine, **pin)
        listener, connector = make_node(lcfg, lsock), make_node(ccfg, udp_socket())
        listener.start()
        connector.start()
        try:
            lt, ct = listener.tunnel, connector.tunnel
            assert await wait_for(lambda: lt.established and ct.established, 10)
            assert lt.active is not None and lt.active.addr[1] == nat.outside.getsockname()[1]
            new_addr = nat.rebind()
            start = loop.time()
            up = [ipv4_udp("198.19.0.2", "198.19.0.1", bytes([i]) * 50) for i in range(20)]
            got: list[bytes] = []
            for p in up:  # a packet every 20 ms: the first ones may be lost while the path is checked
                connector.tun.inject(p)
                await asyncio.sleep(0.02)
                got += listener.tun.read_all()
            got += await listener.tun.async_wait_packets(1, 1)
            assert got, "nothing arrived after the rebinding"
            first_after = up.index(got[0]) * 0.02
            assert first_after < 1.0, first_after
            down = ipv4_udp("198.19.0.1", "198.19.0.2", b"back to the new port")
            listener.tun.inject(down)
            assert await connector.tun.async_wait_packets(1, 2) == [down]
            assert loop.time() - start < 3.0
            assert lt.sessions == ct.sessions == 1  # no new handshake
            assert lt.path_migrations == 1 and lt.active.addr[1] == new_addr[1]
            from l3ptp.worker.app import status_message

            assert status_message(lcfg, lt).counters["path_migrations"] == 1
            assert status_message(lcfg, lt).drops["dgram_wrong_queue"] == 0
        finally:
            await connector.stop()
            await listener.stop()
            nat.close()

    asyncio.run(asyncio.wait_for(main(), 45))


def test_a_stranger_cannot_move_the_session_without_its_connection_id() -> None:
    async def main() -> None:
        from tests.support.worker_fixtures import worker_pair

        async with worker_pair(engine=Engine.AIOQUIC) as pair:
            assert await pair.wait_established()
            lt = pair.listener.tunnel
            stranger = udp_socket()
            port = pair.listener.sock.getsockname()[1]
            stranger.sendto(b"\x40" + bytes(8) + bytes(40), ("127.0.0.1", port))  # a short header, wrong CID
            await asyncio.sleep(0.2)
            assert lt.path_migrations == 0 and lt.active is not None
            assert lt.active.addr == pair.connector.sock.getsockname()
            stranger.close()

    asyncio.run(asyncio.wait_for(main(), 45))
