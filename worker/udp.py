"""UDP batching for the worker: GSO on send, GRO on receive, with fallback.

* **Send (UDP GSO, Linux >= 4.18).** `plan_sends` groups consecutive
  datagrams to the same address with the same size (the last of a group may
  be shorter, as the kernel allows); `UdpIO.send` sends each group of two or
  more with ONE ``sendmsg`` carrying a ``SOL_UDP/UDP_SEGMENT`` cmsg (the
  segment size) and the rest with ``sendto``. The kernel cuts the buffer back
  into datagrams, so the wire is unchanged. If the socket option is missing
  (ENOPROTOOPT at the probe) or a GSO send fails with EIO/EINVAL/ENOPROTOOPT/
  EOPNOTSUPP (e.g. a device without checksum offload), GSO is switched off
  for the socket's lifetime and that group is resent one datagram at a time.
* **Receive (UDP GRO, Linux >= 5.0).** ``setsockopt(SOL_UDP, UDP_GRO, 1)``;
  the kernel may then hand several equal-size datagrams from one sender as
  one buffer with a ``UDP_GRO`` cmsg holding the segment size; `split_gro`
  cuts it back. Without the cmsg the buffer is one datagram. If the option
  is refused, plain ``recvfrom`` is used.

`plan_sends` and `split_gro` are pure and unit-tested; `UdpIO` is the shell.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from l3ptp.ipc.constants import UDP_GSO_MAX_BYTES, UDP_GSO_MAX_SEGMENTS

__all__ = ["UDP_MAX", "SendGroup", "UdpIO", "plan_sends", "split_gro"]

SOL_UDP = getattr(socket, "SOL_UDP", 17)
#: linux/udp.h
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
#: The largest UDP payload, the receive buffer size (the worker also reads TUN packets up to it).
UDP_MAX = 65535
_GRO_ANC = socket.CMSG_SPACE(4)
#: errno values that mean "this socket/device cannot do GSO".
_GSO_UNSUPPORTED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")

#: (address, segment size, datagrams): every datagram but the last has
#: exactly `segment size` bytes; the last has at most that.
SendGroup = tuple[Any, int, list[bytes]]


def plan_sends(
    datagrams: Iterable[tuple[bytes, Any]],
    max_segments: int = UDP_GSO_MAX_SEGMENTS,
    max_bytes: int = UDP_GSO_MAX_BYTES,
) -> list[SendGroup]:
    """Group consecutive datagrams for GSO, keeping their order.

    A group holds datagrams to one address, all of the first one's size
    except possibly a shorter last one, at most `max_segments` of them and
    at most `max_bytes` in total. A datagram that starts no group of two
    (or is longer than `max_bytes`) forms a group of one.
    """
    groups: list[SendGroup] = []
    cur: list[bytes] | None = None
    cur_addr: Any = None
    size = 0
    total = 0
    closed = True  # the current group cannot take more (full, or ended short)
    for data, addr in datagrams:
        n = len(data)
        if (
            cur is not None
            and not closed
            and addr == cur_addr
            and 0 < n <= size
            and len(cur) < max_segments
            and total + n <= max_bytes
        ):
            cur.append(data)
            total += n
            closed = n < size or len(cur) >= max_segments
            continue
        cur = [data]
        cur_addr = addr
        size = n
        total = n
        closed = n == 0 or n > max_bytes or max_segments <= 1
        groups.append((addr, size, cur))
    return groups


def split_gro(buf: bytes | memoryview, segment_size: int) -> list[bytes]:
    """Cut a GRO buffer into its datagrams (every one `segment_size` bytes but the last)."""
    n = len(buf)
    if segment_size <= 0 or segment_size >= n:
        return [bytes(buf)]
    return [bytes(buf[i : i + segment_size]) for i in range(0, n, segment_size)]


def gro_segment_size(ancdata: Sequence[tuple[int, int, bytes]]) -> int:
    """The UDP_GRO segment size in recvmsg ancillary data, 0 if none."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
            return int(_INT.unpack_from(data)[0])
    return 0


def probe_gso(sock: socket.socket) -> bool:
    """True if the kernel knows UDP_SEGMENT for this socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def enable_gro(sock: socket.socket) -> bool:
    """Turn on UDP_GRO; False if the kernel refuses."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class UdpIO:
    """Batched send/receive on one non-blocking UDP socket."""

    __slots__ = ("sock", "gso", "gro", "send_errors", "gso_sends", "gso_segments", "gro_buffers", "gro_segments")

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self.sock = sock
        self.gso = gso and probe_gso(sock)
        self.gro = gro and enable_gro(sock)
        self.send_errors = 0
        self.gso_sends = 0
        self.gso_segments = 0
        self.gro_buffers = 0
        self.gro_segments = 0

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send every datagram, in order; failures are counted in `send_errors`."""
        if not datagrams:
            return
        if not self.gso or len(datagrams) == 1:
            self._send_each(datagrams)
            return
        for addr, size, group in plan_sends(datagrams):
            if len(group) > 1 and self.gso and self._send_gso(addr, size, group):
                continue
            self._send_each([(data, addr) for data in group])

    def _send_each(self, datagrams: Iterable[tuple[bytes, Any]]) -> None:
        sendto = self.sock.sendto
        for data, addr in datagrams:
            try:
                sendto(data, addr)
            except OSError:
                self.send_errors += 1

    def _send_gso(self, addr: Any, size: int, group: list[bytes]) -> bool:
        """One sendmsg for the group; False if it must be resent one by one."""
        try:
            self.sock.sendmsg([b"".join(group)], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
        except OSError as exc:
            if exc.errno in _GSO_UNSUPPORTED:
                self.gso = False
                return False
            self.send_errors += len(group)  # EAGAIN/ENOBUFS/ECONNREFUSED...: the group is lost
            return True
        self.gso_sends += 1
        self.gso_segments += len(group)
        return True

    def recv(self) -> tuple[list[bytes], Any]:
        """The datagrams of one receive and their source; raises OSError (EAGAIN when empty)."""
        if not self.gro:
            data, addr = self.sock.recvfrom(UDP_MAX)
            return [data], addr
        data, anc, _flags, addr = self.sock.recvmsg(UDP_MAX, _GRO_ANC)
        seg = gro_segment_size(anc) if anc else 0
        if seg and seg < len(data):
            parts = split_gro(data, seg)
            self.gro_buffers += 1
            self.gro_segments += len(parts)
            return parts, addr
        return [data], addr
