"""The controller process: wiring of the pure modules to helper, workers and CLI.

Shell (I/O). Decisions live in the pure modules: `supervision` (restart,
fail, kill), `plan` (reload), `routes` (what to install), `status` (what to
report). This module carries out their actions:

* at start (`serve`): PR_SET_NO_NEW_PRIVS=1 (inherited by the workers) and
  PR_SET_DUMPABLE=0 (`l3ptp.ipc.hardening.harden_process`);
* then: create the runtime directory (0711: searchable, not listable),
  bind the worker bus (``workers.sock``, 0600) and the CLI socket
  (``control.sock``, 0660, group ``admin_group``; 0666 with ``polkit = true``,
  each caller then authorised by `l3ptp.controller.polkit`), connect to the helper,
  reconcile with its list of
  networks (networks no longer configured and enabled are destroyed, the
  others adopted), adopt the workers that outlived the previous controller
  (they report on the bus within ADOPT_WAIT_INTERVALS status intervals),
  then bring every enabled network up (spawning only the missing workers);
* per network: ``CreateNetwork(adopt=True)`` (which also yields fresh
  tickets for every respawn), spawn one worker per queue with its
  `WorkerConfig` on stdin, supervise, install peer routes via the helper;
* every second: Heartbeat to each worker, `tick` the supervisors;
* SIGHUP or `l3ptp reload`: `plan.diff` and apply only the difference; an
  invalid file is refused with every error and nothing changes;
* SIGTERM/SIGINT (`systemctl stop`/`restart`, Ctrl-C): hand the workers over
  instead of stopping them: each running worker gets `Handover(grace)` and
  keeps carrying traffic, the ``handover`` marker is left in the runtime
  directory, and the controller exits; the networks stay in the helper
  (fail-closed). The next controller adopts the workers; a worker no
  controller speaks to within HANDOVER_GRACE closes its session and exits.
  `l3ptp down` or a reload without the network destroys it at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import ipaddress
import os
import pwd
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio

from l3ptp.controller import plan as planning
from l3ptp.controller.bus import Router
from l3ptp.controller.config import Config, ConfigError, IPNetwork, NetworkConfig, load_config
from l3ptp.controller.helper_client import HelperClient, HelperError
from l3ptp.controller.polkit import Authorizer, PolkitChecker, action_for, parse_peer_address
from l3ptp.controller.routes import RouteTable
from l3ptp.controller.spawner import ExitCallback, ProcessSpawner, Spawner
from l3ptp.controller.status import network_status, status_reply
from l3ptp.controller.supervision import Kill, NetworkFailed, NetworkSupervisor, Spawn, Terminate, WorkerState
from l3ptp.ipc.control_messages import (
    Advertise,
    BUS_DOWN,
    BUS_UP,
    CLI_REPLIES,
    CLI_REQUESTS,
    CommandFailed,
    CommandResult,
    DownRequest,
    Engine,
    EventLoop,
    Handover,
    Heartbeat,
    PeerRoutes,
    ReloadRequest,
    Shutdown,
    StatusRequest,
    WORKER_CONFIG,
    UpRequest,
    WorkerConfig,
    WorkerExiting,
    WorkerHello,
    WorkerStatus,
)
from l3ptp.ipc.constants import CONTROL_SOCKET, HANDOVER_GRACE
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.hardening import harden_process
from l3ptp.ipc.types import PeerRole

__all__ = ["Controller", "WORKERS_SOCKET", "CONTROL_SOCKET", "RUNTIME_DIR_MODE", "harden_process"]

WORKERS_SOCKET = "workers.sock"
#: Left in the runtime directory by an orderly stop that handed its workers over:
#: the next controller collects them. Its age bounds it (HANDOVER_MARKER_MAX_AGE).
HANDOVER_MARKER = "handover"
#: After this many seconds every handed-over worker has exited (grace plus slack):
#: an older marker is ignored.
HANDOVER_MARKER_MAX_AGE = HANDOVER_GRACE + 5.0
#: Milliseconds the bus keeps the Handover messages queued at close.
HANDOVER_LINGER_MS = 2000
HEARTBEAT_INTERVAL = 1.0
#: Seconds between liveness probes of the helper (ListNetworks).
HELPER_PROBE_INTERVAL = 2.0
#: At start, how many status intervals to wait for the workers of a network
#: the helper still has (they outlived the previous controller) to report.
ADOPT_WAIT_INTERVALS = 2.5
#: The runtime directory: others may reach a socket by name but not list the
#: directory; each socket's own mode is the gate (control.sock 0660 group
#: admin_group, workers.sock 0600). Matches the unit's RuntimeDirectoryMode.
RUNTIME_DIR_MODE = 0o711
CONTROL_SOCKET_MODE = 0o660
#: With ``[controller] polkit = true`` anyone may connect; every request is
#: authorised per caller (SO_PEERCRED, then polkit).
CONTROL_SOCKET_MODE_POLKIT = 0o666
WORKERS_SOCKET_MODE = 0o600

log = structlog.get_logger("l3ptp.controller")

KeyLoader = Callable[[str], bytes]
HelperConnect = Callable[[str], Any]  # async (path) -> HelperClient
SpawnerFactory = Callable[[ExitCallback], Spawner]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def load_key_raw(path: str) -> bytes:
    """Raw 32-byte private key from `path` (worker key format)."""
    from l3ptp.worker.keys import load_private_key, private_key_raw

    return private_key_raw(load_private_key(path))


class _Network:
    """Runtime state of one running network."""

    def __init__(self, net: NetworkConfig) -> None:
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
        self.last_error = ""


class Controller:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        spawner_factory: SpawnerFactory = ProcessSpawner,
        helper_connect: HelperConnect = HelperClient.connect,
        key_loader: KeyLoader = load_key_raw,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.started_at = clock()
        self.spawner = spawner_factory(self._on_exit)
        self._helper_connect = helper_connect
        self._key_loader = key_loader
        self.helper: HelperClient | None = None
        self.networks: dict[str, _Network] = {}
        self.admin_down: set[str] = set()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self.bus: Router | None = None
        self.cli: Router | None = None
        #: Per-caller authorisation of CLI requests; set at start when
        #: ``[controller] polkit`` is true (fixed until the controller restarts).
        self.authorizer: Authorizer | None = None
        self.ready = asyncio.Event()
        self._last_heartbeat = 0.0
        #: Serialises up / down / reload so two never interleave.
        self._ops = asyncio.Lock()
        #: Immutable status snapshot for the metrics thread (refreshed by the timer loop).
        self.metrics_snapshot: Any = None
        self._metrics_server: Any = None
        self._predecessor_crashed = False
        self._handed_over = False
        #: Recently exited workers of this controller: their queued reports are not survivors'.
        self._exited: collections.deque[int] = collections.deque(maxlen=256)
        #: Set by the orderly stop: the bus is no longer used (see `_shutdown`).
        self._leaving = False

    # ---- paths ---------------------------------------------------------------

    @property
    def runtime_dir(self) -> str:
        return self.config.controller.runtime_dir

    @property
    def bus_path(self) -> str:
        return os.path.join(self.runtime_dir, WORKERS_SOCKET)

    @property
    def control_path(self) -> str:
        return os.path.join(self.runtime_dir, CONTROL_SOCKET)

    # ---- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Run until `request_stop()` (SIGTERM), then shut everything down."""
        os.makedirs(self.runtime_dir, mode=RUNTIME_DIR_MODE, exist_ok=True)
        os.chmod(self.runtime_dir, RUNTIME_DIR_MODE)
        self._ctx = zmq.asyncio.Context()
        # Workers of the previous controller may still run, to be adopted, when it handed them over
        # (orderly stop: the marker) or died without its orderly stop (the bus socket left behind).
        self._predecessor_crashed = os.path.exists(self.bus_path)
        self._handed_over = self._take_handover_marker()
        try:
            self.bus = Router(self._ctx, self.bus_path, BUS_UP, BUS_DOWN, mode=WORKERS_SOCKET_MODE)
            admin_gid = self._admin_gid()
            if self.config.controller.polkit:
                # Before the socket exists: no request is ever served unchecked.
                self.authorizer = Authorizer(PolkitChecker(), own_uid=os.geteuid(), admin_gid=admin_gid)
            self.cli = Router(
                self._ctx,
                self.control_path,
                CLI_REQUESTS,
                CLI_REPLIES,
                mode=CONTROL_SOCKET_MODE_POLKIT if self.authorizer is not None else CONTROL_SOCKET_MODE,
                group=admin_gid,
            )
            self.helper = await self._helper_connect(self.config.controller.helper_socket)
            present = await self._reconcile()
            survivors = await self._collect_survivors(present)
            for net in self.config.networks:
                if net.enabled:
                    await self._bring_up(net, survivors.get(net.name, {}), present.get(net.name))
            self._spawn_task(self._run_bus())
            self._spawn_task(self._run_cli())
            self._spawn_task(self._run_timers())
            self._spawn_task(self._run_helper_watch())
            self.metrics_snapshot = self.status(verbose=True)
            m = self.config.metrics
            if m.enabled:
                from l3ptp.controller.metrics import start_server

                self._metrics_server = start_server(lambda: self.metrics_snapshot, str(m.address), m.port)
            self.ready.set()
            log.info("controller_ready", networks=len(self.networks), pid=os.getpid())
            await self._stop.wait()
            await self._shutdown()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.spawner_kill_all()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            if self.helper is not None:
                self.helper.close()
            if self.bus is not None:  # the Handovers queued in _shutdown go out first
                self.bus.close(linger=HANDOVER_LINGER_MS)
            if self.cli is not None:
                self.cli.close()
            self._ctx.term()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def handover_marker_path(self) -> str:
        return os.path.join(self.runtime_dir, HANDOVER_MARKER)

    def _take_handover_marker(self) -> bool:
        """True if the previous controller handed its workers over recently; the marker is removed."""
        try:
            age = time.time() - os.stat(self.handover_marker_path).st_mtime
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.handover_marker_path)
        fresh = -5.0 <= age <= HANDOVER_MARKER_MAX_AGE
        log.info("handover_marker_found", age=round(age, 3), collect=fresh)
        return fresh

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (serialised with CLI commands)."""

        async def reload_locked() -> None:
            async with self._ops:
                await self.reload()

        self._spawn_task(reload_locked())

    async def spawner_kill_all(self) -> None:
        kill_all = getattr(self.spawner, "kill_all", None)
        if kill_all is not None:
            await kill_all()

    def _admin_gid(self) -> int | None:
        """The gid of admin_group, None when unset or unknown (logged)."""
        group = self.config.controller.admin_group
        if not group:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            log.error("admin_group_not_applied", group=group, error="no such group")
            return None

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task_failed", error=repr(task.exception()))
            self._stop.set()

    async def _shutdown(self) -> None:
        """SIGTERM/SIGINT (`systemctl stop` and `restart`): hand the workers over, keep the networks.

        Every running worker on the bus gets `Handover(HANDOVER_GRACE)` and is released (never
        signalled): it carries traffic until the next controller adopts it, or closes its session
        and exits after the grace. A worker not yet on the bus (just spawned) is stopped as before.
        The ``handover`` marker tells the next controller to collect the survivors. The networks'
        interfaces, routes and kill switch stay in the helper, so the tunnel's prefixes stay closed
        while no worker runs (fail-closed); `l3ptp down`, a reload without the network, or
        `l3ptp-helper --cleanup` removes them."""
        log.info("controller_stopping", handover_grace=HANDOVER_GRACE)
        # From now on nothing else goes to a worker on the bus (a Heartbeat after the Handover would
        # cancel its grace) and nothing from one is acted on (a handed-over worker's next status must
        # not look like a stranger's).
        self._leaving = True
        handed: set[int] = set()
        release = getattr(self.spawner, "release", None)
        if release is not None and self.bus is not None:
            for rt in self.networks.values():
                for slot in rt.sup.slots:
                    ident = rt.idents.get(slot.queue)
                    if slot.pid is not None and ident is not None and slot.state is WorkerState.RUNNING:
                        handed.add(slot.pid)
            if handed:
                with contextlib.suppress(OSError):
                    with open(self.handover_marker_path, "w") as f:
                        f.write(f"{os.getpid()}\n")
                for rt in self.networks.values():
                    for slot in rt.sup.slots:
                        if slot.pid in handed:
                            await self.bus.send(rt.idents.pop(slot.queue), Handover(grace=HANDOVER_GRACE))
                            log.info("worker_handed_over", network=rt.net.name, queue=slot.queue, pid=slot.pid)
                release(handed)
        for name, rt in list(self.networks.items()):
            for slot in rt.sup.slots:
                if slot.pid in handed:
                    rt.sup.hand_over(slot.queue)  # released: no longer this controller's to stop
            await self._bring_down(name, "controller stopping", destroy=False)

    # ---- helper ------------------------------------------------------------------

    async def _ensure_helper(self) -> HelperClient:
        if self.helper is None or self.helper.closed:
            self.helper = await self._helper_connect(self.config.controller.helper_socket)
        return self.helper

    async def _run_helper_watch(self) -> None:
        """Notice a lost helper, reconnect, and rebuild what a restarted helper no longer has.

        A helper that restarts (crash, upgrade) adopts our interfaces and
        routes, so normally nothing is lost. A network whose interface was
        deleted meanwhile is unknown to it: every HELPER_PROBE_INTERVAL the
        controller asks the helper for its networks; once the helper answers
        again, each network of ours it does not know is restarted (workers
        stopped, network created anew, workers spawned with fresh tickets,
        routes re-added as the peer re-announces them).
        """
        lost = False
        while True:
            await asyncio.sleep(HELPER_PROBE_INTERVAL)
            async with self._ops:
                try:
                    helper = await self._ensure_helper()
                    known = {info.name for info in await helper.list_networks()}
                except HelperError as exc:
                    if not lost:
                        log.error("helper_lost", error=str(exc))
                    lost = True
                    continue
                if lost:
                    log.info("helper_reconnected")
                    lost = False
                for name, rt in list(self.networks.items()):
                    if name in known or not rt.tickets:
                        continue  # the helper has it, or it was never created
                    log.warning("network_lost_by_helper", network=name)
                    net = rt.net
                    await self._bring_down(name, "the helper no longer has this network")
                    await self._bring_up(net)

    async def _reconcile(self) -> dict[str, Any]:
        """Destroy the helper's networks that are no longer wanted; return the others (name -> NetworkInfo)."""
        helper = await self._ensure_helper()
        wanted = {n.name for n in self.config.networks if n.enabled}
        present = {}
        for info in await helper.list_networks():
            if info.name not in wanted:
                log.info("reconcile_destroy", network=info.name)
                with contextlib.suppress(HelperError):
                    await helper.destroy_network(info.name)
            else:
                present[info.name] = info
        return present

    async def _collect_survivors(self, present: dict[str, Any]) -> dict[str, dict[int, tuple[int, bytes]]]:
        """Workers of `present` networks that outlived the previous controller: name -> queue -> (pid, ident).

        Only after a crash or a handover (see `run`). They reconnect to the bus by themselves and say WorkerStatus every status_interval; wait for that
        (at most ADOPT_WAIT_INTERVALS status intervals, less once every queue has been heard)."""
        found: dict[str, dict[int, tuple[int, bytes]]] = {}
        want = {(n.name, q) for n in self.config.networks if n.name in present for q in range(n.queues)}
        if not (self._predecessor_crashed or self._handed_over):
            return found
        deadline = self.clock() + ADOPT_WAIT_INTERVALS * self.config.controller.status_interval
        while want and self.bus is not None and (left := deadline - self.clock()) > 0:
            try:
                got = await asyncio.wait_for(self.bus.recv(), left)
            except TimeoutError:
                break
            if got is not None and isinstance(got[1], WorkerHello | WorkerStatus) \
                    and (got[1].network, got[1].queue) in want:
                want.discard((got[1].network, got[1].queue))
                found.setdefault(got[1].network, {})[got[1].queue] = (got[1].pid, got[0])
        return found

    def _worker_uid(self) -> int:
        user = self.config.controller.worker_user
        return pwd.getpwnam(user).pw_uid if user else os.getuid()

    async def _fresh_tickets(self, rt: _Network) -> None:
        net = rt.net
        helper = await self._ensure_helper()
        created = await helper.create_network(
            name=net.name,
            ifname=net.interface,
            mtu=net.mtu,
            addresses=[str(a) for a in net.addresses()],
            queues=net.queues,
            worker_uid=self._worker_uid(),
            adopt=True,
        )
        rt.tickets = list(created.tickets)
        if not created.adopted and rt.routes.installed:
            # The helper built the network anew (its interface was deleted
            # behind our back): none of our routes exist any more. Forget
            # them, so the new sessions' announcements install them again.
            log.warning("network_recreated", network=net.name, routes_lost=len(rt.routes.installed))
            rt.routes.set_installed(())

    # ---- networks ----------------------------------------------------------------

    async def _bring_up(self, net: NetworkConfig, survivors: dict[int, tuple[int, bytes]] | None = None,
                        info: Any = None) -> None:
        rt = _Network(net)
        self.networks[net.name] = rt
        try:
            await self._fresh_tickets(rt)
        except (HelperError, KeyError) as exc:
            rt.last_error = f"helper: {exc}"
            rt.sup.failed_reason = rt.last_error
            log.error("network_create_failed", network=net.name, error=str(exc))
            return
        if info is not None:
            rt.routes.set_installed(info.routes)  # the helper kept them; the workers' PeerRoutes confirm them
        adopt = getattr(self.spawner, "adopt", None)
        for queue, (pid, ident) in sorted((survivors or {}).items()):
            if adopt is not None and adopt(pid):
                rt.sup.adopt(queue, pid, self.clock())
                rt.idents[queue] = ident
                log.info("worker_adopted", network=net.name, queue=queue, pid=pid)
                await self._advertise(rt, queue)  # and it repeats the peer's routes for us
        await self._execute(rt, rt.sup.start(self.clock()), fresh=True)
        log.info("network_up", network=net.name, queues=net.queues)

    async def _bring_down(self, name: str, reason: str, *, destroy: bool = True) -> None:
        rt = self.networks.get(name)
        if rt is None:
            return
        await self._execute(rt, rt.sup.stop(self.clock(), reason))
        while not rt.sup.stopped:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
            await self._execute(rt, rt.sup.tick(self.clock()))
        del self.networks[name]
        if destroy:
            with contextlib.suppress(HelperError):
                helper = await self._ensure_helper()
                await helper.destroy_network(name)
        log.info("network_down", network=name, reason=reason, destroyed=destroy)

    async def _execute(self, rt: _Network, actions: list[Any], *, fresh: bool = False) -> None:
        need_tickets = not fresh
        for action in actions:
            if isinstance(action, Spawn):
                if need_tickets:
                    try:
                        await self._fresh_tickets(rt)
                    except HelperError as exc:
                        rt.last_error = f"helper: {exc}"
                        more = rt.sup.on_spawn_failed(action.queue, self.clock(), rt.last_error)
                        await self._execute(rt, more)
                        continue
                    need_tickets = False
                await self._spawn(rt, action.queue)
            elif isinstance(action, Terminate):
                ident = rt.idents.get(action.queue)
                if ident is not None and self.bus is not None:
                    await self.bus.send(ident, Shutdown(reason=action.reason[:512]))
                self.spawner.signal(action.pid, signal.SIGTERM)
            elif isinstance(action, Kill):
                log.warning("worker_kill", network=rt.net.name, queue=action.queue, pid=action.pid, reason=action.reason)
                self.spawner.signal(action.pid, signal.SIGKILL)
            elif isinstance(action, NetworkFailed):
                rt.last_error = action.reason
                log.error("network_failed", network=action.network, reason=action.reason)

    def _worker_config(self, rt: _Network, queue: int, last_peer: str = "") -> WorkerConfig:
        net, cfg = rt.net, self.config
        host, _, port = last_peer.rpartition(":")
        peer_ok = PeerRole(net.role) is PeerRole.LISTEN and _is_address(host) and port.isdigit() and 0 < int(port) < 65536
        return WorkerConfig(
            network=net.name,
            queue=queue,
            queues=net.queues,
            ticket=rt.tickets[queue],
            helper_socket=cfg.controller.helper_socket,
            bus_endpoint=f"ipc://{self.bus_path}",
            role=PeerRole(net.role),
            node_id=cfg.node.id,
            local_address=str(net.underlay.local) if net.underlay.local is not None else None,
            peer_address=str(net.underlay.peer) if net.underlay.peer is not None else None,
            port=net.queue_port(queue),
            mtu=net.mtu,
            max_datagram_size=net.max_datagram_size,
            keepalive_interval=net.keepalive_interval,
            status_interval=cfg.controller.status_interval,
            private_key=self._key_loader(net.key_path(cfg.node)),
            peer_key=net.peer_key,
            tunnel_addresses=tuple(str(a) for a in net.addresses()),
            advertised_routes=tuple(str(r) for r in net.advertised_routes),
            local_sources=tuple(str(r) for r in net.local_sources()),
            peer_sources=tuple(str(r) for r in net.peer_sources()),
            engine=Engine(net.engine),
            event_loop=EventLoop(net.event_loop),
            cpu=net.cpus[queue % len(net.cpus)] if net.cpus else -1,
            user=cfg.controller.worker_user,
            log_level="info",
            last_peer=host if peer_ok else None,
            last_peer_port=int(port) if peer_ok else 0,
        )

    async def _advertise(self, rt: _Network, queue: int) -> None:
        """Tell queue `queue`'s worker the network's advertised routes (it tells the peer)."""
        ident = rt.idents.get(queue)
        if ident is None or self.bus is None:
            return
        net = rt.net
        await self.bus.send(ident, Advertise(
            network=net.name, queue=queue,
            advertised_routes=tuple(str(r) for r in net.advertised_routes),
            local_sources=tuple(str(r) for r in net.local_sources()),
        ))
        rt.advertised[queue] = net.advertised_routes
        log.info("routes_advertised", network=net.name, queue=queue, routes=[str(r) for r in net.advertised_routes])

    async def _spawn(self, rt: _Network, queue: int) -> None:
        now = self.clock()
        report = rt.reports.pop(queue, None)
        rt.idents.pop(queue, None)
        rt.routes.reset_queue(queue)
        try:
            data = WORKER_CONFIG.encode(self._worker_config(rt, queue, report.peer if report is not None else ""))
            rt.advertised[queue] = rt.net.advertised_routes
            pid = await self.spawner.spawn(rt.net.name, queue, data)
        except Exception as exc:  # OSError, a key that cannot be read, ...
            log.error("worker_spawn_failed", network=rt.net.name, queue=queue, error=str(exc))
            await self._execute(rt, rt.sup.on_spawn_failed(queue, now, str(exc)[:200]))
            return
        log.info("worker_spawned", network=rt.net.name, queue=queue, pid=pid)
        await self._execute(rt, rt.sup.on_spawned(queue, pid, self.clock()))

    def _on_exit(self, pid: int, returncode: int | None) -> None:
        self._spawn_task(self._handle_exit(pid, returncode))

    async def _handle_exit(self, pid: int, returncode: int | None) -> None:
        self._exited.append(pid)
        for rt in self.networks.values():
            if rt.sup.slot_by_pid(pid) is not None:
                log.info("worker_exited", network=rt.net.name, pid=pid, returncode=returncode)
                await self._execute(rt, rt.sup.on_exit(pid, self.clock(), returncode))
                break
        self._wake.set()

    # ---- routes ------------------------------------------------------------------

    async def _apply_routes(self, rt: _Network) -> None:
        changes = rt.routes.changes()
        if changes.empty:
            return
        net = rt.net
        try:
            helper = await self._ensure_helper()
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
            rt.last_error = f"routes: {exc}"
            log.error("routes_failed", network=net.name, error=str(exc))

    # ---- bus ---------------------------------------------------------------------

    async def _run_bus(self) -> None:
        assert self.bus is not None
        while True:
            got = await self.bus.recv()
            if got is None:
                continue
            ident, msg = got
            try:
                await self._on_bus(ident, msg)
            except Exception as exc:  # noqa: BLE001 - one worker's message must never stop the controller
                log.error("bus_message_failed", network=msg.network, queue=msg.queue, message=type(msg).__name__,
                          error=repr(exc))

    async def _on_bus(self, ident: bytes, msg: Any) -> None:
        if self._leaving:
            return
        rt = self.networks.get(msg.network)
        if rt is None or not 0 <= msg.queue < rt.net.queues:
            log.warning("bus_unknown_worker", network=msg.network, queue=msg.queue)
            return
        now = self.clock()
        if isinstance(msg, WorkerHello | WorkerStatus):
            if not rt.sup.on_alive(msg.queue, msg.pid, now):
                if rt.sup.slot_by_pid(msg.pid) is None:
                    await self._late_survivor(rt, ident, msg)
                return
            rt.idents[msg.queue] = ident
            if rt.advertised.get(msg.queue) != rt.net.advertised_routes:
                # Started before a reload changed the routes, and not yet on the bus then.
                await self._advertise(rt, msg.queue)
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
            await self._apply_routes(rt)
        elif isinstance(msg, WorkerExiting):
            log.info("worker_exiting", network=msg.network, queue=msg.queue, reason=msg.reason, fatal=msg.fatal,
                     remote=msg.remote)
            if msg.fatal:
                await self._execute(rt, rt.sup.on_fatal(msg.queue, None, now, msg.reason))
            else:
                rt.sup.on_exiting(msg.queue, msg.reason, remote=msg.remote)

    async def _late_survivor(self, rt: _Network, ident: bytes, msg: WorkerHello | WorkerStatus) -> None:
        """A worker this controller does not know reports for a configured queue: a survivor of the
        previous controller heard after the adoption wait (or after a stop that left no marker).

        Adopted (by pidfd) when its queue has no live worker, e.g. the restart is still pending or the
        spawned replacement failed (it could not bind the port the survivor holds); otherwise told to
        Shutdown (it closes its session and exits), at most once per pid. Never fails the network."""
        queue, pid = msg.queue, msg.pid
        if pid in self._exited:
            return  # a report of ours still queued when it exited (never adopt a reused pid)
        adopt = getattr(self.spawner, "adopt", None)
        if rt.sup.can_adopt(queue) and adopt is not None and adopt(pid):
            rt.sup.adopt(queue, pid, self.clock())
            rt.idents[queue] = ident
            if isinstance(msg, WorkerStatus):
                rt.reports[queue] = msg
            rt.routes.reset_queue(queue)
            log.info("worker_adopted", network=rt.net.name, queue=queue, pid=pid, late=True)
            await self._advertise(rt, queue)  # and it repeats the peer's routes for us
            return
        if pid in rt.refused_late:
            return
        if len(rt.refused_late) >= 64:
            rt.refused_late.clear()
        rt.refused_late.add(pid)
        log.warning("late_worker_refused", network=rt.net.name, queue=queue, pid=pid,
                    reason="its queue has a worker" if not rt.sup.can_adopt(queue) else "not adoptable")
        if self.bus is not None:
            await self.bus.send(ident, Shutdown(reason="another worker serves this queue"))

    async def _run_timers(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 4)
            now = self.clock()
            for rt in list(self.networks.values()):
                await self._execute(rt, rt.sup.tick(now))
            self.metrics_snapshot = self.status(verbose=True)
            if now - self._last_heartbeat >= HEARTBEAT_INTERVAL and self.bus is not None and not self._leaving:
                self._last_heartbeat = now
                for rt in list(self.networks.values()):
                    for ident in list(rt.idents.values()):
                        await self.bus.send(ident, Heartbeat())

    # ---- CLI -----------------------------------------------------------------------

    async def _run_cli(self) -> None:
        assert self.cli is not None
        while True:
            if self.authorizer is None:
                got = await self.cli.recv()
                if got is None:
                    continue
                ident, msg = got
            else:
                got_peer = await self.cli.recv_with_peer()
                if got_peer is None:
                    continue
                ident, msg, peer = got_peer
                refusal = await self._authorise(msg, peer)
                if refusal is not None:
                    await self.cli.send(ident, refusal)
                    continue
            try:
                reply = await self._on_cli(msg)
            except Exception as exc:  # never let one request kill the controller
                log.error("cli_request_failed", error=repr(exc))
                reply = CommandFailed(code=ErrorCode.INTERNAL, reason=str(exc)[:512])
            await self.cli.send(ident, reply)

    async def _authorise(self, msg: Any, peer_address: str | None) -> CommandFailed | None:
        """None if the caller may make this request, else the refusal to send (fail closed)."""
        assert self.authorizer is not None
        action = action_for(msg)
        peer = parse_peer_address(peer_address)
        try:
            decision = await self.authorizer.authorize(peer, action)
        except Exception as exc:  # a bug here must refuse, never allow
            log.error("cli_authorisation_failed", action=action, error=repr(exc))
            return CommandFailed(code=ErrorCode.NOT_PERMITTED, reason=f"not authorised: {action} (internal error)")
        who = {"uid": peer.uid, "pid": peer.pid} if peer is not None else {"peer": str(peer_address)[:80]}
        if decision.allowed:
            if decision.how == "polkit":
                log.info("cli_authorised", action=action, how=decision.how, **who)
            return None
        log.warning("cli_refused", action=action, how=decision.how, reason=decision.reason, **who)
        hint = "run as root, join the controller's admin_group, or ask for a polkit rule"
        return CommandFailed(
            code=ErrorCode.NOT_PERMITTED, reason=f"not authorised: {action}: {decision.reason} ({hint})"[:512]
        )

    async def _on_cli(self, msg: Any) -> Any:
        if isinstance(msg, StatusRequest):
            return self.status(verbose=msg.verbose)
        async with self._ops:
            return await self._on_command(msg)

    async def _on_command(self, msg: Any) -> Any:
        if isinstance(msg, ReloadRequest):
            return await self.reload()
        if isinstance(msg, UpRequest | DownRequest):
            net = self.config.network(msg.name)
            if net is None:
                return CommandFailed(code=ErrorCode.NOT_FOUND, reason=f"no network {msg.name!r} in the configuration")
            if isinstance(msg, UpRequest):
                self.admin_down.discard(msg.name)
                rt = self.networks.get(msg.name)
                if rt is not None and not rt.sup.failed:
                    return CommandResult(ok=True, message=f"{msg.name} is already up", errors=())
                if rt is not None:
                    await self._bring_down(msg.name, "restart after failure")
                await self._bring_up(net)
                return CommandResult(ok=True, message=f"{msg.name} is coming up", errors=())
            self.admin_down.add(msg.name)
            await self._bring_down(msg.name, "down requested")
            return CommandResult(ok=True, message=f"{msg.name} is down", errors=())
        return CommandFailed(code=ErrorCode.BAD_REQUEST, reason=f"unsupported request {type(msg).__name__}")

    def status(self, *, verbose: bool) -> Any:
        nets = []
        for net in self.config.networks:
            rt = self.networks.get(net.name)
            nets.append(
                network_status(
                    net,
                    rt.sup if rt is not None else None,
                    rt.reports if rt is not None else {},
                    admin_down=net.name in self.admin_down or not net.enabled,
                    routes=[str(r) for r in sorted(rt.routes.installed, key=str)] if rt is not None else (),
                    last_error=rt.last_error if rt is not None else "",
                )
            )
        return status_reply(
            controller_pid=os.getpid(),
            uptime=self.clock() - self.started_at,
            node_id=self.config.node.id,
            networks=nets,
            verbose=verbose,
        )

    async def reload(self) -> CommandResult | CommandFailed:
        """Re-read the file and apply only the difference; invalid files change nothing."""
        if self.config_path is None:
            return CommandFailed(code=ErrorCode.UNAVAILABLE, reason="started without a configuration file")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload_rejected", errors=list(exc.errors))
            return CommandResult(
                ok=False,
                message=f"configuration rejected, nothing changed ({len(exc.errors)} errors)",
                errors=tuple(e[:512] for e in exc.errors[:1024]),
            )
        return await self.apply(new)

    async def apply(self, new: Config) -> CommandResult:
        plan = planning.diff(self.config, new)
        old = self.config
        for name in (*plan.removed, *plan.changed):
            await self._bring_down(name, "reload")
        self.config = new
        self.admin_down &= {n.name for n in new.networks}
        for name in plan.readvertised:
            rt = self.networks.get(name)
            net = new.network(name)
            if rt is not None and net is not None:
                rt.net = net
                rt.routes.net = net
                for queue in list(rt.idents):
                    await self._advertise(rt, queue)
        for name in (*plan.changed, *plan.added):
            net = new.network(name)
            if net is not None and net.enabled and name not in self.admin_down:
                await self._bring_up(net)
        log.info("reloaded", summary=plan.summary(), before=len(old.networks), after=len(new.networks))
        return CommandResult(ok=True, message=plan.summary(), errors=())


async def serve(config_path: str) -> int:
    """Entry point used by __main__: load, run, map signals."""
    harden_process()
    config = load_config(config_path)
    controller = Controller(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, controller.request_stop)
    loop.add_signal_handler(signal.SIGINT, controller.request_stop)
    loop.add_signal_handler(signal.SIGHUP, controller.request_reload)
    await controller.run()
    return 0
