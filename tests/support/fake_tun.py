"""A fake TUN queue: a non-blocking AF_UNIX SOCK_SEQPACKET socketpair.

Like a TUN fd it keeps packet boundaries (one ``os.read`` returns one
packet) and raises BlockingIOError (EAGAIN) when empty or full, so the real
worker code (``add_reader``, ``os.read`` until EAGAIN, ``os.write``) runs on
it without root. The worker gets `worker_fd`; the test plays the kernel on
`host`.
"""

from __future__ import annotations


import select
import socket
import time

__all__ = ["FakeTun"]


class FakeTun:
    def __init__(self) -> None:
        self.host, self._worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self._worker.setblocking(False)

    @property
    def worker_fd(self) -> int:
        return self._worker.fileno()

    def inject(self, packet: bytes) -> None:
        """The host stack routes `packet` into the tunnel (worker reads it)."""
        self.host.send(packet)

    def read_all(self) -> list[bytes]:
        """Every packet the worker wrote so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self.host.recv(65536))
            except BlockingIOError:
                return out

    def wait_packets(self, count: int, timeout: float) -> list[bytes]:
        """Blocking helper for threads; async tests use `async_wait_packets`."""
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([self.host], [], [], left)
            out += self.read_all()
        return out

    async def async_wait_packets(self, count: int, timeout: float, poll: float = 0.01) -> list[bytes]:
        import asyncio

        out: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < count and loop.time() < deadline:
            out += self.read_all()
            if len(out) < count:
                await asyncio.sleep(poll)
        return out

    def close(self) -> None:
        for s in (self.host, self._worker):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "FakeTun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


