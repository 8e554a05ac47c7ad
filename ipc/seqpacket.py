"""One message per packet over AF_UNIX SOCK_SEQPACKET, fds as SCM_RIGHTS.

The helper's framing, shared by the helper, its two clients and the tests'
fakes. Bytes only: what the bytes mean is the caller's business. `recv`
returns a packet and its fds or raises `FramingError` (`PeerClosed` at EOF)
with every fd that came with the packet already closed; `OSError` from the
socket itself (``BlockingIOError`` on an empty non-blocking socket, a timeout,
a reset) passes through.
"""

from __future__ import annotations

import array
import contextlib
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import DecodeError

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, Future

__all__ = ["Closer", "FramingError", "PeerClosed", "close_fds", "connect", "recv", "recv_async", "send", "send_async"]

_FD = array.array("i").itemsize


class FramingError(DecodeError):
    """A packet over the size cap or with ancillary data other than at most `max_fds` fds.

    `reason` is one of "message over size cap", "truncated control data",
    "unexpected ancillary data" or (`PeerClosed`) "peer closed".
    """


class PeerClosed(FramingError):
    """EOF: the peer closed the connection (or sent an empty packet without fds)."""

    def __init__(self) -> None:
        super().__init__("peer closed")


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def connect(path: str, timeout: float) -> socket.socket:
    """A connected blocking SOCK_SEQPACKET socket; raises OSError (TimeoutError past `timeout` s).

    While the listener's backlog is full a non-blocking connect fails at once with EAGAIN (and asyncio's
    sock_connect then wrongly reports success); a blocking one waits in the kernel's queue with everyone else
    connecting, for at most SO_SNDTIMEO, which is what a client needs when others flood the listener.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    timeout = max(timeout, 1e-3)  # SO_SNDTIMEO 0 would wait for ever
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))
        try:
            sock.connect(path)
        except BlockingIOError:
            raise TimeoutError(f"{path}: backlog still full after {timeout} s") from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class Closer:
    """Closes fds on up to `threads` daemon threads, never on the caller's (the helper's loop).

    A last close can block as long as the file's sender likes (a TCP socket with SO_LINGER and unsent data, a FUSE
    flush, a tty draining), and so can closing a connection with such fds queued. (Resetting SO_LINGER first covers
    sockets only and races a sender that kept a copy.) Past `backlog` fds waiting, the caller closes them itself.
    """

    def __init__(self, threads: int, backlog: int) -> None:
        self.max_threads, self.backlog = threads, backlog
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending = self._threads = 0  # fds given and not yet closed; threads started

    def close(self, fds: Iterable[int]) -> None:
        for fd in fds:
            with self._lock:
                inline = self.pending >= self.backlog
                self.pending += not inline
                start = not inline and self.pending > self._threads < self.max_threads  # every thread has one
                self._threads += start
            if start:
                threading.Thread(target=self._run, name="l3ptp-close", daemon=True).start()
            if inline:
                close_fds([fd])
            else:
                self._queue.put(fd)

    def _run(self) -> None:
        while (fd := self._queue.get()) >= 0:
            close_fds([fd])
            with self._lock:
                self.pending -= 1

    def stop(self) -> None:
        """Let the threads end once their close returns."""
        for _ in range(self._threads):
            self._queue.put(-1)


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send `data` as one packet, with `fds` (not closed here) as SCM_RIGHTS."""
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def recv(sock: socket.socket, max_size: int, max_fds: int,
         close: Callable[[Iterable[int]], None] = close_fds) -> tuple[bytes, list[int]]:
    """One packet of at most `max_size` bytes and the at most `max_fds` fds that came with it.

    On a `FramingError` the fds that came are given to `close` (the helper closes them off its loop).
    """
    # CMSG_LEN (as socket.recv_fds): room for exactly `max_fds`; one more fd sets MSG_CTRUNC.
    data, anc, flags, _ = sock.recvmsg(max_size, socket.CMSG_LEN(max_fds * _FD))
    fds: list[int] = []
    other = False
    for level, kind, cdata in anc:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % _FD]))
        else:
            other = True
    error = (FramingError("message over size cap") if flags & socket.MSG_TRUNC
             else FramingError("truncated control data") if flags & socket.MSG_CTRUNC
             else FramingError("unexpected ancillary data") if other
             else PeerClosed() if not data and not fds
             else None)
    if error is not None:
        close(fds)
        raise error
    return data, fds


async def recv_async(loop: AbstractEventLoop, sock: socket.socket, max_size: int,
                     max_fds: int) -> tuple[bytes, list[int]]:
    """`recv` on a non-blocking socket, waiting in the asyncio `loop` until a packet is there."""
    while True:
        try:
            return recv(sock, max_size, max_fds)
        except BlockingIOError:
            pass
        await _ready(loop, sock, write=False)


async def send_async(loop: AbstractEventLoop, sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """`send` on a non-blocking socket, waiting in the asyncio `loop` while the peer's queue is full."""
    while True:
        try:
            return send(sock, data, fds)
        except BlockingIOError:
            pass
        await _ready(loop, sock, write=True)


async def _ready(loop: AbstractEventLoop, sock: socket.socket, *, write: bool) -> None:
    """Wait in `loop` until `sock` is readable (or, with `write`, writable)."""
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(sock.fileno(), _wake, ready)
    try:
        await ready
    finally:
        remove(sock.fileno())


def _wake(ready: Future[None]) -> None:
    if not ready.done():  # the reader may fire again before the waiting task runs
        ready.set_result(None)
