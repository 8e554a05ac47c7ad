"""A network's lifecycle: create it in the helper, carry out its supervisor's actions, bring it down.

Shell. `NetworkRuntime` is the state of one running network (its
`NetworkSupervisor`, `RouteTable`, tickets, the workers' reports and bus
identities). `NetworkLifecycle` keeps the running networks and does, per
network:

* bring up: ``CreateNetwork(adopt=True)`` (which also yields fresh tickets
  for every respawn), adopt the survivors of the previous controller, then
  ``start`` the supervisor;
* execute the supervisor's actions in order (an action's follow-ups, such as
  the `Kill` of a worker spawned after a stop, run before the next action):
  spawn one worker per queue with its `WorkerConfig` on stdin, Terminate
  (Shutdown on the bus, SIGTERM), Kill (SIGKILL), NetworkFailed;
* install the peer routes the route table wants via the helper;
* bring down: stop the supervisor, wait until no worker is left, destroy the
  network in the helper (not on an orderly controller stop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import signal
from typing import TYPE_CHECKING, Any

import structlog

from l3ptp.controller import mtu as mtus
from l3ptp.controller.config import IPNetwork, NetworkConfig
from l3ptp.controller.helper_client import HelperError
from l3ptp.ipc.errors import ErrorCode, HelperFailed
from l3ptp.controller.pathmtu import choose as choose_mtu
from l3ptp.controller.routes import RouteTable
from l3ptp.controller.supervision import Kill, NetworkFailed, NetworkSupervisor, Spawn, Terminate
from l3ptp.controller.worker_config import build_worker_config, worker_uid
from l3ptp.ipc.control_messages import WORKER_CONFIG, Reregister, Shutdown, WorkerStatus

if TYPE_CHECKING:
    from l3ptp.controller.app import Controller

__all__ = ["NetworkLifecycle", "NetworkRuntime"]

log = structlog.get_logger("l3ptp.controller")


class NetworkRuntime:
    """Runtime state of one running network."""

    def __init__(self, net: NetworkConfig, mtu: mtus.MtuChoice | None = None) -> None:
        #: The network as configured; `net` is what it runs with (its MTU chosen: `mtu = "auto"`).
        self.configured = net
        self.mtu = mtu if mtu is not None else mtus.fixed(net)
        net = mtus.apply(net, self.mtu)
        self.net = net
        self.sup = NetworkSupervisor(net.name, net.queues)
        self.routes = RouteTable(net)
        self.tickets: list[str] = []
        self.reports: dict[int, WorkerStatus] = {}
        self.idents: dict[int, bytes] = {}  # queue -> bus identity
        #: Advertised routes each queue's worker was started with or told.
        self.advertised: dict[int, tuple[IPNetwork, ...]] = {}
        #: pids of late unknown workers told to Shutdown (so it is said once).
        self.refused_late: set[int] = set()
        #: The network's last error, shown in status; set only by `note_error`.
        self.last_error = ""
        #: The private key its workers are to have (read from the key file at spawn and reload), and what
        #: each queue's worker was started with or told (`keying`): a worker behind gets a Rekey.
        self.key = b""
        self.keyed: dict[int, tuple[object, ...]] = {}
        #: The fd of the network's steering map (a shared port), from the helper's NetworkCreated: given back
        #: to a restarted helper so that the steering never changes hands with a gap (helper/reuseport.py).
        self.steering: int | None = None

    def shares_port(self) -> bool:
        """Its listener workers share one UDP port, steered by the helper's program (worker/steering.py)."""
        net = self.net
        return net.role == "listen" and net.queues > 1 and net.underlay.ports == "shared"

    def keep_steering(self, fd: int | None) -> None:
        """The steering map fd a NetworkCreated brought (None: none came; the one held stays)."""
        if fd is not None:
            self.close()
            self.steering = fd

    def close(self) -> None:
        if self.steering is not None:
            os.close(self.steering)
            self.steering = None

    def keying(self, key: bytes | None = None) -> tuple[object, ...]:
        """What a `Rekey` carries, in a form to compare (the key as its digest)."""
        net = self.net
        return (hashlib.sha256(self.key if key is None else key).digest(), net.peer_key, net.peer_keys,
                net.peer_sources())

    def fingerprint(self) -> str:
        """Our key's fingerprint ("" before it was read)."""
        if not self.key:
            return ""
        from l3ptp.worker.keys import fingerprint, private_key_from_raw

        return fingerprint(private_key_from_raw(self.key))

    def note_error(self, text: str) -> None:
        self.last_error = text

    def reconfigure(self, net: NetworkConfig, key: bytes) -> None:
        """A reload changed only what a running network takes on (plan.LIVE_FIELDS, the key): keep running
        with `net` (and the MTU chosen) and `key`; the route table judges the peers' routes again."""
        self.configured = net
        self.net, self.key = mtus.apply(net, self.mtu), key
        self.routes.set_network(self.net)


class NetworkLifecycle:
    """The running networks (name -> `NetworkRuntime`) and everything that starts, runs and stops them."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.running: dict[str, NetworkRuntime] = {}
        #: Recently exited workers of this controller: their queued reports are not survivors'.
        self.recently_exited: collections.deque[int] = collections.deque(maxlen=256)
        #: Set on every worker exit (a network going down waits for it).
        self.wake = asyncio.Event()

    async def fresh_tickets(self, rt: NetworkRuntime) -> None:
        net = rt.net
        helper = await self.ctl.helper_link.ensure()
        created, steering = await helper.create_network(
            name=net.name,
            ifname=net.interface,
            mtu=net.mtu,
            addresses=[str(a) for a in net.addresses()],
            queues=net.queues,
            worker_uid=worker_uid(self.ctl.config),
            adopt=True,
            offload=net.offload != "off",
            steer=rt.shares_port(),
            steering=rt.steering,
        )
        rt.keep_steering(steering)
        rt.tickets = list(created.tickets)
        if not created.adopted and rt.routes.installed:
            # The helper built the network anew (its interface was deleted
            # behind our back): none of our routes exist any more. Forget
            # them, so the new sessions' announcements install them again.
            log.warning("network_recreated", network=net.name, routes_lost=len(rt.routes.installed))
            rt.routes.set_installed(())

    async def bring_up(self, net: NetworkConfig, survivors: dict[int, tuple[int, bytes]] | None = None,
                       info: Any = None) -> None:
        rt = NetworkRuntime(net, await self.choose_mtu(net, info))
        self.running[net.name] = rt
        with contextlib.suppress(Exception):  # unreadable: a spawn fails and says why; adopted workers keep theirs
            rt.key = self.ctl.key_loader(net.key_path(self.ctl.config.node))
        try:
            try:
                await self.fresh_tickets(rt)
            except HelperFailed as exc:
                if exc.code is not ErrorCode.EXISTS or info is None:
                    raise  # EXISTS without a network of ours: its interface name is another network's
                # The helper kept this network from before this controller started (networks outlive it),
                # made with another spec than the configuration asks for now (mtu, addresses, queues,
                # offload, worker user): re-created, as a reload changing these restarts it.
                log.warning("network_spec_changed", network=net.name, action="re-created", helper=str(exc))
                await (await self.ctl.helper_link.ensure()).destroy_network(net.name)
                survivors, info, key = {}, None, rt.key  # its workers held the old interface's queues
                rt.close()
                rt = self.running[net.name] = NetworkRuntime(net, await self.choose_mtu(net))  # the MTU anew
                rt.key = key
                await self.fresh_tickets(rt)
        except (HelperError, KeyError) as exc:
            rt.note_error(f"helper: {exc}")
            rt.sup.create_failed(rt.last_error)
            log.error("network_create_failed", network=net.name, error=str(exc))
            return
        if info is not None:
            rt.routes.set_installed(info.routes)  # the helper kept them; the workers' PeerRoutes confirm them
        await self.ctl.handover.adopt_survivors(rt, survivors or {})
        await self.execute(rt, rt.sup.start(self.ctl.clock()), fresh=True)
        log.info("network_up", network=net.name, queues=net.queues)

    async def choose_mtu(self, net: NetworkConfig, info: Any = None) -> mtus.MtuChoice:
        """The MTU `net` comes up with (`mtu = "auto"`: derived from the path; `info`: the helper still has it)."""
        choice = await choose_mtu(net, self.ctl.config.controller.interface_prefix)
        if info is not None:
            choice = mtus.keep_running(choice, info.mtu)
        if choice.source == mtus.FALLBACK:
            log.warning("mtu_auto_fallback", network=net.name, mtu=choice.mtu, reason=choice.note)
        elif choice.source == mtus.AUTO:
            log.info("mtu_auto", network=net.name, mtu=choice.mtu, max_datagram_size=choice.max_datagram_size,
                     path_mtu=choice.path_mtu, note=choice.note)
        return choice

    async def bring_down(self, name: str, reason: str, *, destroy: bool = True) -> None:
        rt = self.running.get(name)
        if rt is None:
            return
        await self.execute(rt, rt.sup.stop(self.ctl.clock(), reason))
        # Its own loop, not the timers': woken at once by each exit, and it also works while the
        # timers do not run.
        while not rt.sup.stopped:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.2)
            await self.execute(rt, rt.sup.tick(self.ctl.clock()))
        del self.running[name]
        rt.close()
        if destroy:
            with contextlib.suppress(HelperError):
                helper = await self.ctl.helper_link.ensure()
                await helper.destroy_network(name)
        log.info("network_down", network=name, reason=reason, destroyed=destroy)

    async def restart_lost(self, known: set[str]) -> None:
        """Restart each network of ours that the helper (`known`: its networks) no longer has."""
        for name, rt in list(self.running.items()):
            if name in known or not rt.tickets:
                continue  # the helper has it, or it was never created
            log.warning("network_lost_by_helper", network=name)
            net = rt.configured
            await self.bring_down(name, "the helper no longer has this network")
            await self.bring_up(net)

    async def reregister(self, known: set[str]) -> None:
        """A new helper session (perhaps a restarted helper, which took over the steering map we kept, or made a
        new one): every worker of a listening network on one shared UDP port registers its socket again."""
        for name, rt in list(self.running.items()):
            if name in known and rt.shares_port() and rt.idents:
                await self.reregister_queues(rt, sorted(rt.idents))

    async def reregister_queues(self, rt: NetworkRuntime, queues: list[int], *, fresh: bool = False) -> None:
        """The workers of `queues` (running, on the bus) register their sockets with the helper again, each with a
        fresh ticket of its queue (helper/reuseport.py: the helper's program goes on with the first registration;
        on the map it kept every socket is already in place, on a new map each goes in as it registers). After a
        new helper session, and after adopting workers: when the helper and the controller were down at once,
        the helper's map is new and must get every adopted worker's socket before any worker restarts.
        `fresh`: the caller has just made the tickets (bring-up), none of these queues' used yet."""
        name = rt.net.name
        if not fresh:
            try:
                await self.fresh_tickets(rt)
            except HelperError as exc:
                log.warning("reregister_failed", network=name, error=str(exc))
                return
        sent = []
        for queue in queues:
            ident = rt.idents.get(queue)
            if ident is not None:
                await self.ctl.worker_bus.send(ident, Reregister(network=name, queue=queue, ticket=rt.tickets[queue]))
                sent.append(queue)
        log.info("workers_reregister", network=name, queues=sent)

    async def execute(self, rt: NetworkRuntime, actions: list[Any], *, fresh: bool = False) -> None:
        """Carry out `actions` in order; the follow-ups of one (what the supervisor says to a spawn that
        failed or came too late) are carried out before the next. `fresh`: the tickets were just made."""
        pending = collections.deque(actions)
        need_tickets = not fresh
        while pending:
            action = pending.popleft()
            more: list[Any] = []
            if isinstance(action, Spawn):
                if need_tickets:
                    try:
                        await self.fresh_tickets(rt)
                    except HelperError as exc:
                        rt.note_error(f"helper: {exc}")
                        more = rt.sup.on_spawn_failed(action.queue, self.ctl.clock(), rt.last_error)
                        pending.extendleft(reversed(more))
                        continue
                    need_tickets = False
                more = await self._spawn(rt, action.queue)
            elif isinstance(action, Terminate):
                ident = rt.idents.get(action.queue)
                if ident is not None:
                    await self.ctl.worker_bus.send(ident, Shutdown(reason=action.reason[:512]))
                self.ctl.spawner.signal(action.pid, signal.SIGTERM)
            elif isinstance(action, Kill):
                log.warning("worker_kill", network=rt.net.name, queue=action.queue, pid=action.pid, reason=action.reason)
                self.ctl.spawner.signal(action.pid, signal.SIGKILL)
            elif isinstance(action, NetworkFailed):
                rt.note_error(action.reason)
                log.error("network_failed", network=action.network, reason=action.reason)
            pending.extendleft(reversed(more))

    async def _spawn(self, rt: NetworkRuntime, queue: int) -> list[Any]:
        """Start `queue`'s worker; returns the supervisor's follow-up actions."""
        ctl = self.ctl
        now = ctl.clock()
        report = rt.reports.pop(queue, None)
        rt.idents.pop(queue, None)
        rt.routes.reset_queue(queue)
        try:
            config = build_worker_config(
                ctl.config, rt.net, queue, rt.tickets[queue], bus_path=ctl.bus_path, key_loader=ctl.key_loader,
                last_peer=report.peer if report is not None else "",
            )
            data = WORKER_CONFIG.encode(config)
            rt.advertised[queue] = rt.net.advertised_routes
            rt.key, rt.keyed[queue] = config.private_key, rt.keying(config.private_key)
            pid = await ctl.spawner.spawn(rt.net.name, queue, data)
        except Exception as exc:  # OSError, a key that cannot be read, ...
            log.error("worker_spawn_failed", network=rt.net.name, queue=queue, error=str(exc))
            return rt.sup.on_spawn_failed(queue, now, str(exc)[:200])
        log.info("worker_spawned", network=rt.net.name, queue=queue, pid=pid)
        return rt.sup.on_spawned(queue, pid, ctl.clock())

    async def handle_exit(self, pid: int, returncode: int | None) -> None:
        self.recently_exited.append(pid)
        for rt in self.running.values():
            if rt.sup.slot_by_pid(pid) is not None:
                log.info("worker_exited", network=rt.net.name, pid=pid, returncode=returncode)
                await self.execute(rt, rt.sup.on_exit(pid, self.ctl.clock(), returncode))
                break
        self.wake.set()

    async def apply_routes(self, rt: NetworkRuntime) -> None:
        """Ask the helper for the routes the route table wants added and removed."""
        changes = rt.routes.changes()
        if changes.empty:
            return
        net = rt.net
        try:
            helper = await self.ctl.helper_link.ensure()
            if changes.remove:
                reply = await helper.remove_routes(net.name, [str(r) for r in changes.remove])
                rt.routes.set_installed(reply.routes)
            if changes.add:
                reply = await helper.add_routes(
                    net.name,
                    [str(r) for r in changes.add],
                    metric=net.route_metric,
                    allow_default=net.allow_default_route,
                )
                rt.routes.set_installed(reply.routes)
        except HelperError as exc:
            rt.note_error(f"routes: {exc}")
            log.error("routes_failed", network=net.name, error=str(exc))
