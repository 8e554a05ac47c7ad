"""The controller's end of the worker fork server (the "zygote", worker/zygote.py).

Shell. `ForkServer.start()` runs ``python -m l3ptp.worker.zygote`` with one end of a
SOCK_SEQPACKET socketpair; `fork()` asks it for a child, gets the child's pid and a pidfd,
and writes the `WorkerConfig` into the child's stdin pipe itself (the zygote never sees it).

The children are the zygote's, not ours. Their exits come as `ForkedExited(pid, returncode)`
from the zygote, which reaps them; each child's pidfd is also watched, so that when the
zygote is gone (killed, crashed) the exit of a child it left is still reported (with
returncode None, as for an adopted worker), and `signal` goes through the pidfd (never a
reused pid). A lost zygote is reported once through `on_lost`; the spawner then spawns
workers as their own processes (or a new zygote).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import FORK_MESSAGE_MAX
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.fork_messages import FORK_REPLIES, FORK_REQUESTS, ForkedExited, ForkFailed, ForkWorker, WorkerForked

__all__ = ["ForkServer", "zygote_argv"]

ExitCallback = Callable[[int, int | None], None]


def zygote_argv() -> list[str]:
    """The fork server's command line (its socket and the controller's pid are added by `start`)."""
    return [sys.executable, "-m", "l3ptp.worker.zygote"]


class ForkServer:
    """One zygote and the children it forked; see the module docstring."""

    def __init__(self, on_exit: ExitCallback, on_lost: Callable[[ForkServer], None],
                 argv: Sequence[str] | None = None) -> None:
        self._on_exit = on_exit
        self._on_lost = on_lost
        self._argv = list(argv) if argv is not None else zygote_argv()
        self.proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[tuple[int, int]] | None = None
        #: pid -> pidfd of every child not reported as exited yet.
        self.children: dict[int, int] = {}
        #: Children whose pidfd said "exited" while the zygote lives: its ForkedExited is due.
        self._gone: set[int] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Start the zygote; OSError if it cannot be started. It loads in the background: the first
        `fork` waits for that (and fails if the zygote dies loading)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self._argv, "--socket-fd", str(theirs.fileno()), "--parent", str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable)

    async def fork(self, network: str, queue: int, stdin_data: bytes) -> int:
        """A new worker with `stdin_data` written to its stdin (then closed); its pid. OSError if the zygote
        cannot fork (or is gone): the caller then starts the worker some other way."""
        async with self._lock:
            if self._sock is None:
                raise OSError("the fork server is gone")
            read_end, write_end = os.pipe()
            try:
                loop = asyncio.get_running_loop()
                self._pending = loop.create_future()
                try:
                    seqpacket.send(self._sock, FORK_REQUESTS.encode(ForkWorker(network=network, queue=queue)),
                                   [read_end])
                finally:
                    os.close(read_end)
                pid, _ = await self._pending
                await _write_all(write_end, stdin_data)
            finally:
                self._pending = None
                os.close(write_end)
            return pid

    def owns(self, pid: int) -> bool:
        return pid in self.children

    def signal(self, pid: int, sig: int) -> None:
        fd = self.children.get(pid)
        if fd is not None and pid not in self._gone:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, sig)

    def release(self, pid: int) -> None:
        """Forget `pid` (handed over): its exit is no longer reported; it is never signalled."""
        fd = self.children.pop(pid, None)
        if fd is not None:
            if pid not in self._gone:
                asyncio.get_running_loop().remove_reader(fd)
            self._gone.discard(pid)
            os.close(fd)
            self._check_drained()

    async def drained(self) -> None:
        """Until every child is reported (or released)."""
        await self._drained.wait()

    async def stop(self) -> None:
        """End the zygote (its children stay: they are reported, or released, as before)."""
        self._stopping = True
        self._lose()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    # ---- events ---------------------------------------------------------------------------

    def _readable(self) -> None:
        while self._sock is not None:
            try:
                data, fds = seqpacket.recv(self._sock, FORK_MESSAGE_MAX, 1)
            except BlockingIOError:
                return
            except (OSError, seqpacket.FramingError):  # EOF: the zygote is gone
                self._lose()
                return
            try:
                msg = FORK_REPLIES.decode_untrusted(data)
            except DecodeError:
                seqpacket.close_fds(fds)
                self._lose()  # a zygote that says nonsense is not used again
                return
            if isinstance(msg, WorkerForked) and len(fds) == 1:
                self._forked(msg.pid, fds[0])
            elif isinstance(msg, ForkFailed):
                seqpacket.close_fds(fds)
                if self._pending is not None and not self._pending.done():
                    self._pending.set_exception(OSError(f"fork server: {msg.reason}"))
            elif isinstance(msg, ForkedExited):
                seqpacket.close_fds(fds)
                self._exited(msg.pid, msg.returncode)
            else:  # a WorkerForked without its pidfd: a zygote that says nonsense is not used again
                seqpacket.close_fds(fds)
                self._lose()
                return

    def _forked(self, pid: int, pidfd: int) -> None:
        self.children[pid] = pidfd
        self._drained.clear()
        asyncio.get_running_loop().add_reader(pidfd, self._pidfd_readable, pid)
        if self._pending is not None and not self._pending.done():
            self._pending.set_result((pid, pidfd))

    def _pidfd_readable(self, pid: int) -> None:
        asyncio.get_running_loop().remove_reader(self.children[pid])
        if self.alive:
            self._gone.add(pid)  # the zygote reaps it and says with which status
        else:
            self._exited(pid, None)

    def _exited(self, pid: int, returncode: int | None) -> None:
        fd = self.children.pop(pid, None)
        if fd is None:
            return  # released, or not ours
        if pid in self._gone:
            self._gone.discard(pid)
        else:
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        self._check_drained()
        self._on_exit(pid, returncode)

    def _check_drained(self) -> None:
        if not self.children:
            self._drained.set()

    def _lose(self) -> None:
        """The zygote is gone (or being stopped): exits from now on come from the pidfds alone."""
        if self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(OSError("the fork server is gone"))
        for pid in sorted(self._gone):  # exited, status never to come
            self._exited(pid, None)
        if not self._stopping:
            self._on_lost(self)


async def _write_all(fd: int, data: bytes) -> None:
    """Write `data` to the pipe `fd` without blocking the loop; a reader that died is no error here
    (its exit is reported)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    loop = asyncio.get_running_loop()
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
        except (BrokenPipeError, ConnectionResetError):
            return


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():  # the writer may fire again before the waiting task runs
        ready.set_result(None)
