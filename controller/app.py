"""The controller process: wiring of the pure modules to helper, workers and CLI.

Shell (I/O). Decisions live in the pure modules: `supervision` (restart,
fail, kill), `plan` (reload), `routes` (what to install), `status` (what to
report). The shells that carry out their actions, one job each, are wired
here: `networks` (a network's lifecycle), `worker_config`, `worker_bus`,
`handover`, `helper_link`, `cli_server` and `reload`. This module owns the
sockets, the main loop and the timers:

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
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq
import zmq.asyncio

from l3ptp.controller.bus import Router
from l3ptp.controller.cli_server import CliServer
from l3ptp.controller.config import Config, load_config
from l3ptp.controller.handover import Handover
from l3ptp.controller.helper_client import HelperClient
from l3ptp.controller.helper_link import HelperConnect, HelperLink
from l3ptp.controller.networks import NetworkLifecycle, NetworkRuntime
from l3ptp.controller.reload import Reloader
from l3ptp.controller.spawner import ExitCallback, ProcessSpawner, Spawner
from l3ptp.controller.status import network_status, status_reply
from l3ptp.controller.worker_bus import WorkerBus
from l3ptp.controller.worker_config import KeyLoader, load_key_raw
from l3ptp.ipc.constants import CONTROL_SOCKET, HANDOVER_GRACE
from l3ptp.ipc.control_messages import BUS_DOWN, BUS_UP, CommandFailed, CommandResult
from l3ptp.ipc.hardening import harden_process

__all__ = ["Controller", "WORKERS_SOCKET", "CONTROL_SOCKET", "RUNTIME_DIR_MODE", "harden_process"]

WORKERS_SOCKET = "workers.sock"
#: Milliseconds the bus keeps the Handover messages queued at close.
HANDOVER_LINGER_MS = 2000
HEARTBEAT_INTERVAL = 1.0
#: The runtime directory: others may reach a socket by name but not list the
#: directory; each socket's own mode is the gate (control.sock 0660 group
#: admin_group, workers.sock 0600). Matches the unit's RuntimeDirectoryMode.
RUNTIME_DIR_MODE = 0o711
WORKERS_SOCKET_MODE = 0o600

log = structlog.get_logger("l3ptp.controller")

SpawnerFactory = Callable[[ExitCallback], Spawner]


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
        self.key_loader = key_loader
        self.helper_link = HelperLink(helper_connect, lambda: self.config.controller.helper_socket)
        self.lifecycle = NetworkLifecycle(self)
        #: The running networks (name -> NetworkRuntime), kept by `lifecycle`.
        self.networks: dict[str, NetworkRuntime] = self.lifecycle.running
        self.worker_bus = WorkerBus(self)
        self.handover = Handover(self)
        self.cli_server = CliServer(self)
        self.reloader = Reloader(self)
        self.admin_down: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self.bus: Router | None = None
        self.cli: Router | None = None
        self.ready = asyncio.Event()
        self._last_heartbeat = 0.0
        #: Serialises up / down / reload (and the helper probe) so two never interleave.
        self.ops = asyncio.Lock()
        #: Immutable status snapshot for the metrics thread (refreshed by the timer loop).
        self.metrics_snapshot: Any = None
        self._metrics_server: Any = None
        #: Set by the orderly stop: the bus is no longer used (see `_shutdown`).
        self.leaving = False

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
        predecessor_crashed = os.path.exists(self.bus_path)
        handed_over = self.handover.take_marker()
        try:
            self.bus = Router(self._ctx, self.bus_path, BUS_UP, BUS_DOWN, mode=WORKERS_SOCKET_MODE)
            self.cli = self.cli_server.open(self._ctx, self.control_path, self.cli_server.admin_gid())
            await self.helper_link.ensure()
            present = await self.helper_link.reconcile(self.config)
            survivors = await self.handover.collect_survivors(
                present, predecessor_crashed=predecessor_crashed, handed_over=handed_over)
            for net in self.config.networks:
                if net.enabled:
                    await self.lifecycle.bring_up(net, survivors.get(net.name, {}), present.get(net.name))
            self._spawn_task(self.worker_bus.run())
            self._spawn_task(self.cli_server.run())
            self._spawn_task(self._run_timers())
            self._spawn_task(self.helper_link.watch(self.ops, self.lifecycle.restart_lost, self.lifecycle.reregister))
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
            self.helper_link.close()
            if self.bus is not None:  # the Handovers queued in _shutdown go out first
                self.bus.close(linger=HANDOVER_LINGER_MS)
            if self.cli is not None:
                self.cli.close()
            self._ctx.term()

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: reload in the background (serialised with CLI commands)."""

        async def reload_locked() -> None:
            async with self.ops:
                await self.reload()

        self._spawn_task(reload_locked())

    async def spawner_kill_all(self) -> None:
        kill_all = getattr(self.spawner, "kill_all", None)
        if kill_all is not None:
            await kill_all()

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
        self.leaving = True
        handed = await self.handover.hand_over()
        for name, rt in list(self.networks.items()):
            for slot in rt.sup.slots:
                if slot.pid in handed:
                    rt.sup.hand_over(slot.queue)  # released: no longer this controller's to stop
            await self.lifecycle.bring_down(name, "controller stopping", destroy=False)

    # ---- workers -------------------------------------------------------------------

    def _on_exit(self, pid: int, returncode: int | None) -> None:
        """The spawner's exit callback."""
        self._spawn_task(self.lifecycle.handle_exit(pid, returncode))

    async def _run_timers(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 4)
            now = self.clock()
            for rt in list(self.networks.values()):
                await self.lifecycle.execute(rt, rt.sup.tick(now))
            self.metrics_snapshot = self.status(verbose=True)
            if now - self._last_heartbeat >= HEARTBEAT_INTERVAL and self.bus is not None and not self.leaving:
                self._last_heartbeat = now
                await self.worker_bus.heartbeat()

    # ---- requests ------------------------------------------------------------------

    def status(self, *, verbose: bool) -> Any:
        nets = []
        for net in self.config.networks:
            rt = self.networks.get(net.name)
            nets.append(
                network_status(
                    rt.net if rt is not None else net,  # rt.net: with the MTU chosen (mtu = "auto")
                    rt.sup if rt is not None else None,
                    rt.reports if rt is not None else {},
                    admin_down=net.name in self.admin_down or not net.enabled,
                    routes=[str(r) for r in sorted(rt.routes.installed, key=str)] if rt is not None else (),
                    last_error=rt.last_error if rt is not None else "",
                    mtu_source=rt.mtu.source if rt is not None else "",
                    mtu_note=rt.mtu.note if rt is not None else "",
                    local_key=rt.fingerprint() if rt is not None else "",
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
        """Re-read the file and apply only the difference (see `l3ptp.controller.reload`)."""
        return await self.reloader.reload()

    async def apply(self, new: Config) -> CommandResult:
        return await self.reloader.apply(new)


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
