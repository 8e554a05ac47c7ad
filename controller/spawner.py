"""Starting and reaping worker processes, behind the `Spawner` seam.

The controller only ever asks a `Spawner` to start a worker (with the
encoded `WorkerConfig` for its stdin), to signal a pid, and gets told about
exits through the `on_exit(pid, returncode)` callback given at construction.
Tests use tests/support/fake_spawner.py instead (supervisor's ``options.fork``
seam, but injected, not patched).

`ProcessSpawner` forks workers from a fork server (controller/forkserver.py, worker/zygote.py)
that has imported and warmed up everything once, so that the workers share those pages; when
there is none (it cannot start, it died FORK_SERVER_STARTS_MAX times) it starts each worker as
its own ``python -m l3ptp.worker`` process, with a spare started ahead, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from l3ptp.controller.forkserver import ForkServer, zygote_argv
from l3ptp.ipc.constants import FORK_SERVER_STARTS_MAX

__all__ = ["ExitCallback", "ProcessSpawner", "Spawner", "worker_argv"]

ExitCallback = Callable[[int, int | None], None]

#: Popen objects of released (handed-over) workers; see `ProcessSpawner.release`.
_RELEASED: list[object] = []

log = structlog.get_logger("l3ptp.controller")


class Spawner(Protocol):
    async def spawn(self, network: str, queue: int, stdin_data: bytes) -> int:
        """Start the worker of `network`/`queue`, write `stdin_data`, close stdin; return its pid.

        Raises OSError when the process cannot be started.
        """
        ...

    def signal(self, pid: int, sig: int) -> None:
        """Send `sig` to `pid` if it is still ours and alive (never raises)."""
        ...

    # Optional: `adopt(pid) -> bool` (take over a worker of an earlier controller) and
    # `release(pids)` (let them outlive this one); the controller checks with getattr.


def worker_argv(network: str, queue: int) -> list[str]:
    """The worker's command line; network and queue are for `ps` only (its config comes on stdin)."""
    return [sys.executable, "-m", "l3ptp.worker", "--network", network, "--queue", str(queue)]


class ProcessSpawner:
    """Workers forked by the fork server (`fork_server`: its command line; None: never), else real
    subprocesses via asyncio; reaps (or has reaped) each one and reports its exit.

    Without a fork server, after the first spawn it keeps one *spare*: a worker process started ahead, which has imported
    everything and waits for its config on stdin. The next spawn hands the config to the spare (a
    killed worker is replaced in tens of milliseconds instead of an interpreter start, about 0.6-0.9 s)
    and starts a new spare. `kill_all` ends the spare too (its stdin closes: it exits at once).
    """

    def __init__(self, on_exit: ExitCallback, argv: Callable[[str, int], Sequence[str]] = worker_argv,
                 fork_server: Callable[[], Sequence[str]] | None = zygote_argv) -> None:
        self._on_exit = on_exit
        self._argv = argv
        self._fork_argv = fork_server
        #: The fork server in use, the ones that still have children (it among them), how many were started.
        self._server: ForkServer | None = None
        self._servers: list[ForkServer] = []
        self._server_starts = 0
        self._server_task: asyncio.Task[None] | None = None
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._reapers: set[asyncio.Task[None]] = set()
        self._reaper_of: dict[int, asyncio.Task[None]] = {}
        #: Adopted workers (children of an earlier controller): pid -> pidfd, readable once it exited.
        self._adopted: dict[int, int] = {}
        self._spare: asyncio.subprocess.Process | None = None
        self._spare_task: asyncio.Task[None] | None = None

    def adopt(self, pid: int) -> bool:
        """Watch `pid`, a worker that outlived the previous controller; False if it is gone already."""
        if pid in self._procs or pid in self._adopted or self._server_of(pid) is not None:
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self._adopted[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._adopted_exit, pid)
        self._ensure_spare()  # its replacement, should it die, is ready too
        return True

    def _forking(self) -> bool:
        return self._fork_argv is not None and (self._server is not None or self._server_starts < FORK_SERVER_STARTS_MAX)

    def _server_of(self, pid: int) -> ForkServer | None:
        return next((fs for fs in self._servers if fs.owns(pid)), None)

    async def _start_server(self) -> None:
        assert self._fork_argv is not None
        self._server_starts += 1
        fs = ForkServer(self._on_exit, self._server_lost, self._fork_argv())
        try:
            await fs.start()
        except OSError as exc:
            log.warning("fork_server_unavailable", error=str(exc), fallback="subprocess")
            return
        self._server = fs
        self._servers.append(fs)
        log.info("fork_server_started", pid=fs.proc.pid if fs.proc else None, start=self._server_starts)

    def _server_lost(self, fs: ForkServer) -> None:
        if fs is self._server:
            self._server = None
        if not fs.children and fs in self._servers:
            self._servers.remove(fs)
        log.warning("fork_server_lost", pid=fs.proc.pid if fs.proc else None,
                    fallback="a new fork server" if self._forking() else "subprocess")

    async def _fork(self, network: str, queue: int, stdin_data: bytes) -> int | None:
        """The pid of a worker the fork server forked, None when there is none to ask (or it failed)."""
        if self._server is None and self._forking():
            if self._server_task is None or self._server_task.done():
                self._server_task = asyncio.get_running_loop().create_task(self._start_server())
            await asyncio.shield(self._server_task)
        fs = self._server
        if fs is None:
            return None
        try:
            return await fs.fork(network, queue, stdin_data)
        except OSError as exc:
            log.warning("fork_server_failed", network=network, queue=queue, error=str(exc), fallback="subprocess")
            return None

    def _ensure_spare(self) -> None:
        if self._forking():  # the fork server is the spare: start it ahead
            if self._server is None and (self._server_task is None or self._server_task.done()):
                self._server_task = asyncio.get_running_loop().create_task(self._start_server())
            return
        if self._spare is None and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.get_running_loop().create_task(self._make_spare())

    def _adopted_exit(self, pid: int) -> None:
        fd = self._adopted.pop(pid)
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        self._on_exit(pid, None)  # not our child: its status went to whoever reaps it

    async def _start(self, network: str, queue: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self._argv(network, queue), stdin=asyncio.subprocess.PIPE, start_new_session=True
        )

    async def _make_spare(self) -> None:
        with contextlib.suppress(OSError):
            self._spare = await self._start("spare", -1)

    async def spawn(self, network: str, queue: int, stdin_data: bytes) -> int:
        if self._forking():
            pid = await self._fork(network, queue, stdin_data)
            if pid is not None:
                self._ensure_spare()
                return pid
        proc, self._spare = self._spare, None
        if proc is None or proc.returncode is not None:
            proc = await self._start(network, queue)
        self._ensure_spare()
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin_data)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died at once; the reaper reports the exit
        finally:
            proc.stdin.close()
        self._procs[proc.pid] = proc
        task = asyncio.get_running_loop().create_task(self._reap(proc))
        self._reaper_of[proc.pid] = task
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)
        return proc.pid

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        self._procs.pop(proc.pid, None)
        self._reaper_of.pop(proc.pid, None)
        self._on_exit(proc.pid, rc)

    def signal(self, pid: int, sig: int) -> None:
        fs = self._server_of(pid)
        if fs is not None:
            fs.signal(pid, sig)
            return
        if pid in self._adopted:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._adopted[pid], sig)
            return
        proc = self._procs.get(pid)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    def release(self, pids: set[int]) -> None:
        """Let `pids` outlive this controller (orderly stop, handover): forget them, never kill them.

        asyncio kills a child whose subprocess transport is closed while it runs (at exit, or when
        the transport is collected); a released worker's transport is marked closed first (its stdin
        is closed already, its other streams are inherited, not pipes), so nothing here ends it. Its
        exit then goes to whoever reaps it; the next controller adopts it by pidfd."""
        for pid in pids:
            fs = self._server_of(pid)
            if fs is not None:
                fs.release(pid)
            proc = self._procs.pop(pid, None)
            if proc is not None:
                transport = getattr(proc, "_transport", None)
                if transport is not None:
                    transport._closed = True  # noqa: SLF001 - see above
                    # Kept until the interpreter exits: no finaliser then warns about (or waits for)
                    # a child that is the next controller's.
                    _RELEASED.append(transport.get_extra_info("subprocess"))
            fd = self._adopted.pop(pid, None)
            if fd is not None:
                asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
            task = self._reaper_of.pop(pid, None)
            if task is not None:  # it would report an exit this controller no longer owns
                self._reapers.discard(task)
                task.cancel()

    async def kill_all(self) -> None:
        """Last resort at exit: SIGKILL what is left and reap it; end the spare and the fork server."""
        for task in (self._spare_task, self._server_task):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(ProcessLookupError):
                spare.kill()
            await spare.wait()
        forked = [pid for fs in self._servers for pid in fs.children]
        for pid in [*self._procs, *self._adopted, *forked]:
            self.signal(pid, signal.SIGKILL)
        for fs in list(self._servers):
            await fs.drained()  # reaped by the zygote (or, without it, seen through the pidfds)
            await fs.stop()
        self._servers.clear()
        self._server = None
        for pid in list(self._adopted):
            self._adopted_exit(pid)
        if self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)
