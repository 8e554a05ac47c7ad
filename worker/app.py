"""Worker application: the tunnel plus the controller bus.

`run_worker(config, tun_fd, udp_sock, bus=None)` is the whole worker once
privileges are dropped and the fds are in hand (worker/__main__.py gets
them from the helper; tests pass a fake TUN and a loopback socket). It runs
until `Shutdown` from the controller, controller silence for
CONTROLLER_SILENCE_TIMEOUT, `stop_event` (SIGTERM), or the end of the grace of
a `Handover` (the controller stopped in order and left it running) without a
word from the next controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Protocol

import structlog

from l3ptp.ipc.constants import CONTROLLER_SILENCE_TIMEOUT
from l3ptp.ipc.control_messages import (
    BUS_DOWN,
    BUS_UP,
    Advertise,
    Handover,
    Heartbeat,
    PeerRoutes,
    Rekey,
    Reregister,
    Shutdown,
    WorkerConfig,
    WorkerExiting,
    WorkerHello,
    WorkerStatus,
)
from l3ptp.ipc.errors import DecodeError, ErrorCode
from l3ptp.ipc.schema import Message
from l3ptp.ipc.text import printable

from . import steering
from .helper_client import HelperError
from .session import RoutesChanged
from .tunnel import Tunnel

log = structlog.get_logger("l3ptp.worker")

__all__ = ["Bus", "ZmqBus", "run_worker", "status_message"]

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


class Bus(Protocol):
    """The worker's side of the controller bus."""

    def send(self, msg: Message) -> None: ...

    async def recv(self) -> Message: ...

    def close(self) -> None: ...


class ZmqBus:
    """A zmq DEALER connected to the controller's ROUTER."""

    def __init__(self, endpoint: str) -> None:
        import zmq
        import zmq.asyncio

        self._zmq = zmq
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.SNDHWM, 100)
        self._sock.connect(endpoint)

    def send(self, msg: Message) -> None:
        with contextlib.suppress(self._zmq.Again):
            # Never block the loop: a full queue toward a stuck controller drops status.
            self._sock.send(BUS_UP.encode(msg), flags=self._zmq.NOBLOCK)

    async def recv(self) -> Message:
        while True:
            data = await self._sock.recv()
            try:
                return BUS_DOWN.decode_untrusted(data)
            except DecodeError:
                continue

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


def status_message(config: WorkerConfig, tunnel: Tunnel) -> WorkerStatus:
    st = tunnel.status()
    c = tunnel.counters
    return WorkerStatus(
        network=config.network,
        queue=config.queue,
        pid=os.getpid(),
        state=st.state,
        peer=st.peer[:64],
        rtt_ms=min(st.rtt_ms, 3600_000.0),
        mtu=st.mtu,
        # Traffic counters plus what the data path did with packets over the MTU.
        counters={**c.snapshot(), "tun_fragmented": tunnel.datapath.fragmented,
                  "icmp_too_big_sent": tunnel.datapath.icmp_too_big_sent,
                  # TUN offloads (docs/worker.md): super-packets split, coalesced writes.
                  **{k: min(v, _U64_MAX) for k, v in tunnel.tun.counters().items()},
                  "peer_route_limit": c.peer_route_limit,
                  # UDP datagrams the kernel refused to send, and received ones no connection took.
                  "udp_send_errors": min(tunnel.udp.send_errors if tunnel.udp else 0, _U64_MAX),
                  "udp_ignored": min(tunnel.udp_ignored, _U64_MAX),
                  # The peer's address changed under its connection (NAT rebinding, roaming).
                  "path_migrations": min(tunnel.path_migrations, _U64_MAX),
                  # Sessions moved to a new connection without a gap (key rotation), and failed attempts.
                  **{k: min(v, _U64_MAX) for k, v in tunnel.renewal_counters().items()},
                  # A connector's peer name that did not resolve (each attempt; last_error says why).
                  "peer_resolve_failures": min(tunnel.peer_resolve_failures, _U64_MAX),
                  # REALITY listener: senders passed, refused by reason, relayed (docs/protocol.md).
                  **({k: min(v, _U64_MAX) for k, v in tunnel.reality.counters().items()} if tunnel.reality else {})},
        drops=c.drops_snapshot(),
        queue_depth=st.queue_depth,
        # Both grow with what the peer does (sequence numbers, reconnects):
        # saturate at the wire limits rather than fail to build the report.
        seq_lost=min(c.seq_lost, _U64_MAX),
        sessions=min(st.sessions, _U32_MAX),
        key_updates=min(st.key_updates, 2**32 - 1),
        peer_key=st.peer_key,
        last_error=st.last_error[:512],
    )


async def run_worker(
    config: WorkerConfig,
    tun_fd: int,
    udp_sock: socket.socket,
    bus: Bus | None = None,
    *,
    stop_event: asyncio.Event | None = None,
    tunnel: Tunnel | None = None,
) -> str:
    """Run one worker queue; return why it stopped."""
    stop_event = stop_event or asyncio.Event()
    reason = "stopped"
    remote = False
    last_routes: list[PeerRoutes] = []  # the newest, sent again for a controller that adopts us

    def on_routes(session: int, change: RoutesChanged) -> None:
        if bus is not None:
            last_routes[:] = [
                PeerRoutes(
                    network=config.network,
                    queue=config.queue,
                    session=min(session, _U32_MAX),
                    epoch=change.epoch,
                    routes=change.routes,
                    tunnel_addresses=change.tunnel_addresses,
                )
            ]
            bus.send(last_routes[0])

    if tunnel is None:
        tunnel = Tunnel(config, tun_fd, udp_sock, on_routes=on_routes)
    else:
        tunnel.on_routes = on_routes
    loop = asyncio.get_running_loop()
    last_heard = loop.time()
    #: Set by `Handover`: exit cleanly at this time unless a controller speaks first.
    handover_deadline: float | None = None

    async def status_loop() -> None:
        assert bus is not None
        while True:
            bus.send(status_message(config, tunnel))
            await asyncio.sleep(config.status_interval)

    reregistering: set[asyncio.Future[None]] = set()  # kept until done (a task nobody holds may vanish)

    async def reregister(ticket: str) -> None:
        """A restarted helper rebuilds the shared port's steering (worker/steering.py); off the loop (blocking)."""
        try:
            steered = await loop.run_in_executor(None, steering.register_again, config, udp_sock, ticket)
            log.info("socket_registered_again", steered=steered)
        except (HelperError, OSError) as exc:
            log.warning("socket_register_again_failed", error=str(exc))

    async def bus_loop() -> None:
        nonlocal reason, last_heard, handover_deadline
        assert bus is not None
        while True:
            msg = await bus.recv()
            last_heard = loop.time()
            if isinstance(msg, Handover):
                # The old controller's last word: keep the tunnel up for the next one.
                handover_deadline = last_heard + msg.grace
                continue
            handover_deadline = None  # a controller speaks (the next one after a handover)
            if isinstance(msg, Shutdown):
                reason = f"shutdown: {msg.reason}"
                stop_event.set()
                return
            if isinstance(msg, Advertise):
                if (msg.network, msg.queue) == (config.network, config.queue):
                    tunnel.advertise(msg.advertised_routes, msg.local_sources)
                    for routes in last_routes:  # a new controller knows nothing of the peer's routes yet
                        bus.send(routes)
                continue
            if isinstance(msg, Reregister):
                if (msg.network, msg.queue) == (config.network, config.queue):
                    task = asyncio.ensure_future(reregister(msg.ticket))
                    reregistering.add(task)
                    task.add_done_callback(reregistering.discard)
                continue
            if isinstance(msg, Rekey):
                if (msg.network, msg.queue) == (config.network, config.queue):
                    tunnel.rekey(private_key=msg.private_key, peer_key=msg.peer_key, peer_keys=msg.peer_keys,
                                 peer_keys_not_after=msg.peer_keys_not_after, peer_sources=msg.peer_sources)
                continue
            assert isinstance(msg, Heartbeat)

    async def silence_loop() -> None:
        nonlocal reason
        while True:
            await asyncio.sleep(0.25)
            if handover_deadline is not None and loop.time() >= handover_deadline:
                reason = "controller stopped"
                stop_event.set()
                return
            if loop.time() - last_heard > CONTROLLER_SILENCE_TIMEOUT:
                reason = "controller silent"
                stop_event.set()
                return

    tasks = [asyncio.create_task(tunnel.run())]
    if bus is not None:
        bus.send(WorkerHello(network=config.network, queue=config.queue, pid=os.getpid()))
        tasks += [
            asyncio.create_task(status_loop()),
            asyncio.create_task(bus_loop()),
            asyncio.create_task(silence_loop()),
        ]
    waiter = asyncio.create_task(stop_event.wait())
    try:
        done, _ = await asyncio.wait([waiter, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        if tasks[0] in done and tasks[0].exception() is not None:
            reason = f"tunnel failed: {tasks[0].exception()!r}"
        elif tasks[0] in done and tunnel.exit_reason:
            reason = tunnel.exit_reason
            remote = tunnel.exit_on_network_input
    finally:
        tunnel.stop(ErrorCode.SHUTDOWN, reason[:200])
        for task in [waiter, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
        if bus is not None:
            bus.send(WorkerExiting(network=config.network, queue=config.queue, reason=printable(reason)[:512],
                                   fatal=False, remote=remote))
    return reason
