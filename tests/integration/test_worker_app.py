"""run_worker with an in-memory controller bus; the peer is a real Tunnel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from l3ptp.ipc.control_messages import (
    Advertise,
    BUS_DOWN,
    Engine,
    BUS_UP,
    Handover,
    Heartbeat,
    PeerRoutes,
    Shutdown,
    WorkerExiting,
    WorkerHello,
    WorkerStatus,
)
from l3ptp.ipc.schema import Message
from l3ptp.worker.app import run_worker
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import ENGINES, Node, make_node, pair_configs, udp_socket, wait_for

pytestmark = pytest.mark.timeout(60)


class FakeBus:
    """Records what the worker sends (after a codec round trip); feeds it messages."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.closed = False

    def send(self, msg: Message) -> None:
        self.sent.append(BUS_UP.decode_untrusted(BUS_UP.encode(msg)))

    async def recv(self) -> Message:
        msg = await self.inbox.get()
        return BUS_DOWN.decode_untrusted(BUS_DOWN.encode(msg))

    def close(self) -> None:
        self.closed = True

    def of(self, kind: type[Message]) -> list[Message]:
        return [m for m in self.sent if isinstance(m, kind)]


@contextlib.asynccontextmanager
async def _worker_and_peer(
    engine: Engine = Engine.AIOQUIC,
) -> AsyncIterator[tuple[Node, Node, FakeBus, asyncio.Task[Any]]]:
    """run_worker (the listener, own node) on a FakeBus, established with a real Tunnel peer.

    Yields (own, peer, bus, the run_worker task); on exit the task is cancelled and everything closed.
    """
    lcfg, ccfg, lsock = pair_configs(engine)
    peer = make_node(ccfg, udp_socket())
    peer.start()
    own = make_node(lcfg, lsock)
    bus = FakeBus()
    worker = asyncio.create_task(run_worker(lcfg, own.tun.worker_fd, lsock, bus, tunnel=own.tunnel))
    try:
        assert await wait_for(lambda: own.tunnel.established and peer.tunnel.established, 10)
        yield own, peer, bus, worker
    finally:
        worker.cancel()
        await peer.stop()
        own.tun.close()
        lsock.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_reports_status_routes_and_exits_on_shutdown(engine: Engine) -> None:
    async def main():
        async with _worker_and_peer(engine) as (own, peer, bus, worker):
            await bus.inbox.put(Heartbeat())
            p = ipv4_udp("198.19.0.2", "198.19.0.1", b"via app")
            peer.tun.inject(p)
            assert await own.tun.async_wait_packets(1, 5) == [p]
            assert await wait_for(lambda: any(s.state == "established" and s.counters["tun_tx_packets"] == 1
                                              for s in bus.of(WorkerStatus)), 5)
            changes: list = []
            peer.tunnel.on_routes = lambda _session, change: changes.append(change)
            sources = own.tunnel.params.local_sources
            await bus.inbox.put(Advertise(network="net0", queue=1, advertised_routes=("198.19.40.0/24",),
                                          local_sources=sources))  # another queue's: not ours
            await bus.inbox.put(Advertise(network="net0", queue=0, advertised_routes=("198.19.30.0/24",),
                                          local_sources=sources))
            assert await wait_for(lambda: bool(changes), 5)
            assert [c.routes for c in changes] == [("198.19.30.0/24",)]
            # Over the MTU: one without DF goes as fragments, one with DF is answered with ICMP.
            for df in (False, True):
                own.tun.inject(ipv4_udp("198.19.0.1", "198.19.0.2", b"M" * 1300, df=df))
            assert await wait_for(lambda: any(s.counters.get("tun_fragmented") == 1
                                              and s.counters.get("icmp_too_big_sent") == 1
                                              for s in bus.of(WorkerStatus)), 5)
            await bus.inbox.put(Shutdown(reason="operator"))
            reason = await asyncio.wait_for(worker, 5)
            assert reason == "shutdown: operator"
            # The peer received CLOSE(SHUTDOWN) and is backing off to reconnect.
            assert await wait_for(lambda: "SHUTDOWN" in peer.tunnel.last_error, 5), peer.tunnel.last_error
        assert isinstance(bus.sent[0], WorkerHello)
        routes = bus.of(PeerRoutes)
        assert routes and routes[0].session == 1 and routes[0].tunnel_addresses == ("198.19.0.2/24", "fd00::2/64")
        last = bus.sent[-1]
        assert isinstance(last, WorkerExiting) and not last.fatal
        status = bus.of(WorkerStatus)[-1]
        assert status.network == "net0" and status.queue == 0 and status.mtu == 1280
        assert any(s.rtt_ms > 0 for s in bus.of(WorkerStatus))
        assert set(status.drops) >= {"queue_full", "tun_oversize", "dgram_bad_header"}

    asyncio.run(asyncio.wait_for(main(), 45))


def test_worker_handed_over_keeps_the_tunnel_until_the_grace_then_closes_cleanly() -> None:
    """Handover (orderly controller stop): the worker carries traffic on; a word of the next controller
    cancels the grace; after a second Handover and no word within the grace it closes the session
    (CLOSE to the peer) and exits with "controller stopped"."""

    async def main():
        async with _worker_and_peer() as (own, peer, bus, worker):
            loop = asyncio.get_running_loop()
            await bus.inbox.put(Handover(grace=0.6))
            await bus.inbox.put(Heartbeat())  # the next controller speaks: adopted, no deadline
            await asyncio.sleep(1.2)
            assert not worker.done()
            p = ipv4_udp("198.19.0.2", "198.19.0.1", b"still carried")
            peer.tun.inject(p)
            assert await own.tun.async_wait_packets(1, 5) == [p]
            t0 = loop.time()
            await bus.inbox.put(Handover(grace=0.6))
            reason = await asyncio.wait_for(worker, 5)
            assert reason == "controller stopped"
            assert 0.5 <= loop.time() - t0 < 2.0
            assert await wait_for(lambda: "SHUTDOWN" in peer.tunnel.last_error, 5), peer.tunnel.last_error
        last = bus.sent[-1]
        assert isinstance(last, WorkerExiting) and last.reason == "controller stopped" and not last.fatal

    asyncio.run(asyncio.wait_for(main(), 45))


def test_an_older_worker_drops_a_handover_it_cannot_decode() -> None:
    """Workers that predate Handover decode BUS_DOWN without it: the frame is a DecodeError, which
    ZmqBus.recv skips (it never reaches the worker loop)."""
    from l3ptp.ipc.codec import Channel
    from l3ptp.ipc.errors import DecodeError

    old = Channel("bus-down", BUS_DOWN.max_bytes, (Heartbeat, Shutdown, Advertise))
    with pytest.raises(DecodeError):
        old.decode_untrusted(BUS_DOWN.encode(Handover(grace=10.0)))


def test_worker_ends_when_its_tun_queue_goes_away() -> None:
    """A dead queue fd (the interface deleted under the worker) ends the worker with a reason, non-fatal."""

    async def main():
        async with _worker_and_peer() as (own, _, bus, worker):
            own.tun.host.close()  # the kernel side of the queue disappears
            reason = await asyncio.wait_for(worker, 5)
            assert reason.startswith("TUN queue unusable"), reason
        last = bus.sent[-1]
        assert isinstance(last, WorkerExiting) and not last.fatal and last.reason.startswith("TUN queue unusable")
        assert not last.remote  # a local fault: the controller counts it as a crash

    asyncio.run(asyncio.wait_for(main(), 45))


def test_worker_ending_on_network_input_says_so() -> None:
    """An exception while handling a received datagram ends the worker (clean
    state on restart), and its last words say the cause came from the network,
    so the controller does not count it toward FAILED."""

    async def main():
        async with _worker_and_peer() as (own, peer, bus, worker):
            def boom(*_a, **_kw):
                raise RuntimeError("\x1b[2Jboom")

            asyncio.get_running_loop().set_exception_handler(lambda _loop, _ctx: None)
            own.tunnel._write_tun = boom
            peer.tun.inject(ipv4_udp("198.19.0.2", "198.19.0.1", b"x"))
            reason = await asyncio.wait_for(worker, 5)
            assert reason.startswith("internal error in _on_udp_readable"), reason
        last = bus.sent[-1]
        assert isinstance(last, WorkerExiting) and not last.fatal and last.remote
        assert last.reason == "internal error in _on_udp_readable: RuntimeError('\\x1b[2Jboom')"

    asyncio.run(asyncio.wait_for(main(), 45))


def _send_control(node: Node, msg: Message) -> None:
    """Put one control message on `node`'s stream 0, as a hostile peer would."""
    from l3ptp.ipc.codec import frame
    from l3ptp.ipc.peer_messages import PEER_CONTROL

    peer = node.tunnel.active
    peer.conn.send_stream_data(peer.stream_id, frame(PEER_CONTROL, msg))
    node.tunnel._transmit(peer)


@pytest.mark.parametrize("engine", ENGINES)
def test_routes_adding_up_past_the_limit_close_the_session_not_the_worker(engine: Engine) -> None:
    """Legal ROUTE_UPDATEs (200 prefixes each) that add up past 256 routes: the
    worker closes that session with LIMIT and counts it; it does not raise
    (SchemaError building PeerRoutes) and end, so the controller never sees a
    crash. The peer is told, reconnects, and the worker serves it again."""
    from l3ptp.ipc.peer_messages import RouteUpdate

    async def main():
        async with _worker_and_peer(engine) as (own, peer, bus, worker):
            await bus.inbox.put(Heartbeat())
            for epoch, start in ((10, 0), (11, 200)):
                routes = tuple(f"10.{(start + i) // 256}.{(start + i) % 256}.0/24" for i in range(200))
                _send_control(peer, RouteUpdate(add_routes=routes, remove_routes=(), route_epoch=epoch))
            assert await wait_for(lambda: "LIMIT" in peer.tunnel.last_error, 5), peer.tunnel.last_error
            assert "more than 256" in peer.tunnel.last_error
            assert own.tunnel.counters.peer_route_limit == 1
            assert own.tunnel.exit_reason is None and not worker.done()
            assert await wait_for(lambda: own.tunnel.established and own.tunnel.sessions >= 2, 10)
            assert await wait_for(lambda: any(s.counters.get("peer_route_limit") == 1
                                              for s in bus.of(WorkerStatus)), 5)
            assert not bus.of(WorkerExiting)
        assert [len(r.routes) for r in bus.of(PeerRoutes)][:2] == [0, 200]

    asyncio.run(asyncio.wait_for(main(), 45))


def test_status_saturates_what_the_peer_makes_grow() -> None:
    """Sequence-gap loss and the session count grow with what the peer does;
    the report saturates at the wire limits instead of failing to build."""
    from l3ptp.worker.app import status_message

    lcfg, _, lsock = pair_configs()
    node = make_node(lcfg, lsock)
    try:
        tracker = node.tunnel.counters.rx_sequence
        for seq in range(0, 2**32, 2**31 - 1):  # each step just under half the space: all "forward"
            tracker.observe(seq)
        tracker._highest += 2**66  # a span no real peer reaches, but nothing stops the arithmetic
        node.tunnel.sessions = 2**32 + 7
        status = status_message(lcfg, node.tunnel)
        assert status.seq_lost == 2**64 - 1 and status.sessions == 2**32 - 1
    finally:
        node.tun.close()
        lsock.close()
