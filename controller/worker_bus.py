"""The controller's side of the worker bus (ZeroMQ ROUTER ``workers.sock``).

Shell. Receives every worker's messages (already decoded as untrusted by
`l3ptp.controller.bus.Router`) and acts on them: hello and status keep a
worker alive and record its bus identity and report; `PeerRoutes` feed the
network's route table (then the helper); `WorkerExiting` is the worker's
last words. Only a worker the supervisor knows by pid, speaking from the
identity it said hello from, is listened to; an unknown worker for a
configured queue is a late survivor (`handover`). Sends Heartbeat, Advertise
and Shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from l3ptp.ipc.control_messages import Advertise, Heartbeat, PeerRoutes, Rekey, WorkerExiting, WorkerHello, WorkerStatus

if TYPE_CHECKING:
    from l3ptp.controller.app import Controller
    from l3ptp.controller.networks import NetworkRuntime

__all__ = ["WorkerBus"]

log = structlog.get_logger("l3ptp.controller")


class WorkerBus:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    async def send(self, ident: bytes, msg: Any) -> None:
        """Send `msg` to the worker at bus identity `ident` (nothing before the bus exists)."""
        if self.ctl.bus is not None:
            await self.ctl.bus.send(ident, msg)

    async def heartbeat(self) -> None:
        """A Heartbeat to every worker on the bus (none once the controller is leaving)."""
        if self.ctl.bus is None or self.ctl.leaving:
            return
        for rt in list(self.ctl.networks.values()):
            for ident in list(rt.idents.values()):
                await self.ctl.bus.send(ident, Heartbeat())

    async def advertise(self, rt: NetworkRuntime, queue: int) -> None:
        """Tell queue `queue`'s worker the network's advertised routes (it tells the peer)."""
        ident = rt.idents.get(queue)
        if ident is None or self.ctl.bus is None:
            return
        net = rt.net
        await self.ctl.bus.send(ident, Advertise(
            network=net.name, queue=queue,
            advertised_routes=tuple(str(r) for r in net.advertised_routes),
            local_sources=tuple(str(r) for r in net.local_sources()),
        ))
        rt.advertised[queue] = net.advertised_routes
        log.info("routes_advertised", network=net.name, queue=queue, routes=[str(r) for r in net.advertised_routes])

    async def rekey(self, rt: NetworkRuntime, queue: int) -> None:
        """Tell queue `queue`'s worker the network's key, pinned peer keys and peer sources (it renews its
        session where they no longer match it)."""
        ident = rt.idents.get(queue)
        if ident is None or self.ctl.bus is None or not rt.key:
            return
        net = rt.net
        await self.ctl.bus.send(ident, Rekey(
            network=net.name, queue=queue, private_key=rt.key, peer_key=net.peer_key,
            peer_keys=tuple(k for k, _ in net.peer_keys), peer_keys_not_after=tuple(t for _, t in net.peer_keys),
            peer_sources=tuple(str(r) for r in net.peer_sources()),
        ))
        rt.keyed[queue] = rt.keying()
        log.info("worker_rekeyed", network=net.name, queue=queue, pinned=len(net.peer_keys) or 1)

    async def run(self) -> None:
        assert self.ctl.bus is not None
        while True:
            got = await self.ctl.bus.recv()
            if got is None:
                continue
            ident, msg = got
            try:
                await self.on_message(ident, msg)
            except Exception as exc:  # noqa: BLE001 - one worker's message must never stop the controller
                log.error("bus_message_failed", network=msg.network, queue=msg.queue, message=type(msg).__name__,
                          error=repr(exc))

    async def on_message(self, ident: bytes, msg: Any) -> None:
        ctl = self.ctl
        if ctl.leaving:
            return
        rt = ctl.networks.get(msg.network)
        if rt is None or not 0 <= msg.queue < rt.net.queues:
            log.warning("bus_unknown_worker", network=msg.network, queue=msg.queue)
            return
        now = ctl.clock()
        if isinstance(msg, WorkerHello | WorkerStatus):
            if not rt.sup.on_alive(msg.queue, msg.pid, now):
                if rt.sup.slot_by_pid(msg.pid) is None:
                    await ctl.handover.late_survivor(rt, ident, msg)
                return
            rt.idents[msg.queue] = ident
            if rt.advertised.get(msg.queue) != rt.net.advertised_routes:
                # Started before a reload changed the routes, and not yet on the bus then.
                await self.advertise(rt, msg.queue)
            if rt.key and rt.keyed.get(msg.queue) != rt.keying():  # the same for the keys (or started before the rest)
                await self.rekey(rt, msg.queue)
            if isinstance(msg, WorkerStatus):
                rt.reports[msg.queue] = msg
        elif rt.idents.get(msg.queue) != ident:
            log.warning("bus_unverified_sender", network=msg.network, queue=msg.queue, message=type(msg).__name__)
        elif isinstance(msg, PeerRoutes):
            update = rt.routes.on_peer_routes(msg.queue, msg.session, msg.epoch, msg.routes)
            if update is None:
                log.info("routes_stale", network=msg.network, queue=msg.queue, session=msg.session, epoch=msg.epoch)
                return
            for refused in update.refused:
                log.warning("route_refused", network=msg.network, route=refused.route, reason=refused.reason)
            await ctl.lifecycle.apply_routes(rt)
        elif isinstance(msg, WorkerExiting):
            log.info("worker_exiting", network=msg.network, queue=msg.queue, reason=msg.reason, fatal=msg.fatal,
                     remote=msg.remote)
            if msg.fatal:
                await ctl.lifecycle.execute(rt, rt.sup.on_fatal(msg.queue, None, now, msg.reason))
            else:
                rt.sup.on_exiting(msg.queue, msg.reason, remote=msg.remote)
