"""`python -m l3ptp.worker.zygote`: the controller's fork server for workers.

Theory of operation
-------------------
A worker started as its own interpreter (``python -m l3ptp.worker``) imports qh3/aioquic,
cryptography, zmq, structlog and the worker modules itself: about 28 MiB of private memory
(PSS) each. The zygote imports all of that once, warms the QUIC engines up (`preload` of the
target module), moves every object it has into the permanent GC generation (`gc.freeze`, so a
child's collections do not write to, and so copy, the shared pages) and then forks one child
per request. A child shares those pages copy-on-write with the zygote and its siblings.

What it holds: nothing secret and nothing privileged. It runs as the controller's user with
the controller's (no) capabilities, with no_new_privs, not dumpable (no ptrace by a worker of
the same uid); it never sees a worker's configuration
(the controller writes it into the child's stdin pipe after the fork); it opens no zmq
context, no asyncio loop, no socket but its one SOCK_SEQPACKET to the controller; it is
single-threaded (checked before every fork).

Protocol (ipc/fork_messages.py): `ForkWorker` with the stdin pipe as fd -> `WorkerForked(pid)`
with a pidfd of the child as fd (opened before the zygote could reap it: never a reused
pid), or `ForkFailed`. The zygote reaps its children and says `ForkedExited(pid, returncode)`.

A child becomes the worker exactly as ``python -m l3ptp.worker`` would start: a new session,
the pipe as fd 0, fds 1 and 2 as inherited from the controller, every other fd closed
(`os.closerange(3, ...)`: the zygote's socket, its epoll fd, the pidfds of its siblings),
default signal dispositions, and then the target's `main`, which drops privileges as always.
Random state: `os.urandom`/`secrets` keep no state; Python's `random` re-seeds itself in a
forked child; OpenSSL (cryptography) and AWS-LC and rand (qh3) detect the fork and re-seed.
The one thing shared is the str/bytes hash seed of the interpreter (as with any fork).

Lifetime: PR_SET_PDEATHSIG(SIGKILL), and EOF on its socket: it ends with its controller.
Children it leaves running then (handed over, or after a controller crash) are reparented
(init reaps them) and adopted by the next controller by pid, as before.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import traceback
from collections.abc import Callable

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import FORK_MESSAGE_MAX
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.fork_messages import FORK_REPLIES, FORK_REQUESTS, ForkedExited, ForkFailed, ForkWorker, WorkerForked
from l3ptp.ipc.hardening import PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, libc, prctl

__all__ = ["DEFAULT_TARGET", "main", "set_process_name"]

#: The function a child runs, and whose module's `preload()` the zygote runs first.
DEFAULT_TARGET = "l3ptp.worker.__main__:forked_main"
_PR_SET_NAME = 15
#: What `ps -o comm` and /proc/<pid>/comm say (the cmdline is the zygote's: ``-m l3ptp.worker.zygote``).
ZYGOTE_NAME = b"l3ptp-zygote"
WORKER_NAME = b"l3ptp-worker"


def set_process_name(name: bytes) -> None:
    """PR_SET_NAME (15 bytes at most); best effort."""
    with contextlib.suppress(OSError, AttributeError):
        libc().prctl(_PR_SET_NAME, name[:15] + b"\0", 0, 0, 0)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _load(target: str) -> Callable[[], int]:
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    preload = getattr(module, "preload", None)
    if preload is not None:
        preload()
    return getattr(module, func or "main")  # type: ignore[no-any-return]


def _become_worker(stdin_fd: int, request: ForkWorker) -> None:
    """In the child, before the target runs: what a fresh ``python -m l3ptp.worker`` would have."""
    os.setsid()
    prctl(PR_SET_DUMPABLE, 1)
    if stdin_fd != 0:
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    set_process_name(WORKER_NAME)
    sys.argv = [sys.argv[0], "--network", request.network, "--queue", str(request.queue)]
    gc.enable()


def _fork(stdin_fd: int, request: ForkWorker, target: Callable[[], int]) -> int:
    """Fork the child that runs `target`; returns its pid (in the zygote only)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _become_worker(stdin_fd, request)
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the zygote's loop
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # as an interpreter's exit would (logging's shutdown)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


class Zygote:
    def __init__(self, sock: socket.socket, target: Callable[[], int]) -> None:
        self.sock = sock
        self.target = target
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ)
        #: pidfd -> pid of every child not reaped yet.
        self.children: dict[int, int] = {}

    def _reply(self, msg: WorkerForked | ForkFailed | ForkedExited, fds: list[int] | None = None) -> None:
        seqpacket.send(self.sock, FORK_REPLIES.encode(msg), fds or [])

    def _request(self) -> bool:
        """Serve one request; False when the controller is gone."""
        try:
            data, fds = seqpacket.recv(self.sock, FORK_MESSAGE_MAX, 1)
        except (seqpacket.PeerClosed, ConnectionResetError):
            return False
        except seqpacket.FramingError as exc:
            self._reply(ForkFailed(reason=f"bad request: {exc}"))
            return True
        try:
            request = FORK_REQUESTS.decode_untrusted(data)
            if len(fds) != 1:
                raise DecodeError("ForkWorker without its stdin fd")
        except DecodeError as exc:
            seqpacket.close_fds(fds)
            self._reply(ForkFailed(reason=f"bad request: {exc}"[:512]))
            return True
        assert isinstance(request, ForkWorker)
        try:
            if _threads() != 1:
                raise OSError(f"the fork server runs {_threads()} threads: it does not fork")
            pid = _fork(fds[0], request, self.target)
        except OSError as exc:
            self._reply(ForkFailed(reason=f"fork: {exc}"[:512]))
            return True
        finally:
            os.close(fds[0])
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # out of fds: a child nobody could watch is no worker
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self._reply(ForkFailed(reason=f"pidfd: {exc}"[:512]))
            return True
        self.children[pidfd] = pid
        self.sel.register(pidfd, selectors.EVENT_READ)
        self._reply(WorkerForked(pid=pid), [pidfd])
        return True

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):  # the controller may be gone; its EOF comes next
            self._reply(ForkedExited(pid=pid, returncode=max(-255, min(255, code))))

    def serve(self) -> int:
        """Until the controller is gone (EOF, or it can no longer be written to)."""
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.fileobj is self.sock:
                        if not self._request():
                            return 0
                    else:
                        self._reap(key.fd)  # type: ignore[arg-type]
        except (BrokenPipeError, ConnectionResetError):
            return 0


def main(argv: list[str] | None = None) -> int:
    gc.disable()  # nothing to collect while loading; frozen below
    parser = argparse.ArgumentParser(prog="l3ptp-worker-zygote")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="the controller's pid")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="module:function a child runs")
    args = parser.parse_args(argv)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.parent:
        return 0  # the controller died before the line above
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    # Not dumpable: a worker (same uid) taken over through a parser bug cannot ptrace the zygote and so
    # every worker forked after it. A child is made dumpable again, as an exec'd worker is.
    prctl(PR_SET_DUMPABLE, 0)
    set_process_name(ZYGOTE_NAME)
    sock = socket.socket(fileno=args.socket_fd)
    sock.setblocking(True)
    try:
        target = _load(args.target)
    except Exception:  # noqa: BLE001 - the controller sees EOF and spawns without us
        traceback.print_exc()
        return 1
    gc.collect()
    gc.freeze()
    return Zygote(sock, target).serve()


if __name__ == "__main__":
    sys.exit(main())
