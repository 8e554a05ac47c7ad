"""The worker's TUN queue: plain reads and writes, or with TUN offloads (IFF_VNET_HDR). A shell.

`probe` asks the kernel how the helper made the device (TUNGETIFF on the worker's own queue fd, no capability
needed) and, for an IFF_VNET_HDR device, enables TSO4/TSO6 and checksum offload (TUNSETOFFLOAD, also
capability-free on an attached queue: the setting is the device's, every worker of the network sets the same).
Three modes, each logged with its reason by the tunnel at start:

* plain: the device has no IFF_VNET_HDR (the network's `offload = "off"`, or not a TUN at all: the tests' fake);
* vnet without offload (the fallback): the device has IFF_VNET_HDR but the kernel refused TUNSETOFFLOAD; every
  packet still carries a virtio_net_hdr (always gso_type NONE), nothing is split or coalesced;
* offload: reads may be super-packets, split into IP packets (`vnet.split`); what the peer sends is queued
  and coalesced (`gro.coalesce`) when `flush` runs at the end of each UDP wake-up. With `offload = "gro"`
  the worker asks the kernel for no offload (TUNSETOFFLOAD 0): reads are ordinary packets behind a zero
  header, only the writes are coalesced.

None of it changes the wire: the peer gets one IP packet per DATAGRAM in every mode, so either end may use any
mode (docs/worker.md, "TUN offloads").
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from l3ptp.ipc.counters import Counters, DropReason

from . import native
from .gro import coalesce
from .vnet import IP_MAX, IPV6_HEADER, NEEDS_CSUM, PLAIN_HEADER, VNET_HDR_LEN, BadVnet, split

log = structlog.get_logger("l3ptp.worker")

__all__ = ["TunIO", "TunMode", "probe"]

TUNSETOFFLOAD, TUNGETIFF = 0x400454D0, 0x800454D2
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
#: A plain read: the largest IP packet. With a virtio_net_hdr: the header and the largest super-packet.
READ_PLAIN, READ_VNET = IP_MAX, VNET_HDR_LEN + IP_MAX + IPV6_HEADER
_IFREQ = struct.Struct("16sH")
#: The read loop in C (worker/native.py), or None.
_tun_read = native.fastpath.tun_read if native.fastpath is not None else None


@dataclasses.dataclass(frozen=True, slots=True)
class TunMode:
    #: Every packet read and written carries a virtio_net_hdr (the device has IFF_VNET_HDR).
    vnet: bool
    #: Writes are coalesced, and reads split (TSO and checksum offload on, unless `offload = "gro"`).
    offload: bool
    reason: str


PLAIN = TunMode(False, False, "device without IFF_VNET_HDR")


def probe(fd: int, ioctl: Callable[..., Any] = fcntl.ioctl, *, tso: bool = True) -> TunMode:
    """The mode of TUN queue `fd`, with offloads switched on where the device allows; without `tso` the kernel
    is asked for none (it segments and checksums what it hands over) and only writes are coalesced."""
    try:
        flags = _IFREQ.unpack_from(ioctl(fd, TUNGETIFF, bytes(40)))[1]
    except OSError as exc:
        return TunMode(False, False, f"not a TUN device ({os.strerror(exc.errno or errno.EINVAL)})")
    if not flags & IFF_VNET_HDR:
        return PLAIN
    try:
        ioctl(fd, TUNSETOFFLOAD, OFFLOADS if tso else 0)
    except OSError as exc:
        return TunMode(True, False, f"TUNSETOFFLOAD refused ({os.strerror(exc.errno or errno.EINVAL)}): "
                                    "virtio_net_hdr without offloads")
    if not tso:
        return TunMode(True, True, "GRO only: writes coalesced, TSO and checksum offload off (offload = gro)")
    return TunMode(True, True, "TSO4, TSO6 and checksum offload on")


class TunIO:
    """Reads and writes of one TUN queue in its `TunMode`; counts what it splits, coalesces and drops."""

    def __init__(self, fd: int, mode: TunMode, counters: Counters, written: Callable[[Any], None],
                 local_addresses: Iterable[str] = ()) -> None:
        self.fd, self.mode, self._counters, self._written = fd, mode, counters, written
        #: The TUN's own addresses (packed): coalesced packets to them are delivered here, checked by the kernel.
        self._local = frozenset(ipaddress.ip_interface(a).ip.packed for a in local_addresses)
        self._pending: list[Any] = []
        #: Segments of a split read past the batch's limit: the first packets of the next batch.
        self.carry: list[bytes] = []
        self._read_size = READ_VNET if mode.vnet else READ_PLAIN
        self.gso_split = 0  #: super-packets read and split
        self.gso_segments = 0  #: the IP packets they made
        self.gro_writes = 0  #: writes of coalesced super-packets
        self.gro_merged = 0  #: the packets they carried
        self.gro_fallback = 0  #: 1 once the kernel refused a super-packet without NEEDS_CSUM (see flush)

    def counters(self) -> dict[str, int]:
        return {"tun_offload": int(self.mode.offload), "tun_gso_split": self.gso_split,
                "tun_gso_segments": self.gso_segments, "tun_gro_writes": self.gro_writes,
                "tun_gro_merged": self.gro_merged, "tun_gro_fallback": self.gro_fallback}

    def read_batch(self, limit: int) -> tuple[list[bytes], str | None]:
        """At most `limit` IP packets (reads until EAGAIN), and why the queue is unusable (None: it is fine).
        A super-packet's segments past `limit` are kept in `carry` for the next batch (the caller comes back
        for them without waiting for the fd): so a batch never holds more than a plain TUN's, and the bounded
        queue toward QUIC is not overrun by the 45 segments of each read. The reads run in C where the
        worker's native module is built (`_fastpath.tun_read`), else here; either way at most `limit` reads."""
        packets, self.carry = self.carry[:limit], self.carry[limit:]
        reads = limit - len(packets)
        if _tun_read is not None:
            fd, size, vnet = self.fd, self._read_size, self.mode.vnet
            while reads > 0 and len(packets) < limit:  # never more reads than the batch has room for
                got, raw, status = _tun_read(fd, size, min(reads, limit - len(packets)), vnet)
                packets += got
                if status:
                    return packets, "end of file" if status < 0 else os.strerror(status)
                if raw is None:  # EAGAIN, or every read done
                    break
                reads -= len(got) + 1
                if self._add_split(raw, packets, limit):
                    break
            return packets, None
        read, fd, size, vnet = os.read, self.fd, self._read_size, self.mode.vnet
        for _ in range(reads):  # at most `limit` reads, refused ones included; none once the batch is full
            if len(packets) >= limit:
                break
            try:
                data = read(fd, size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                return packets, exc.strerror or str(exc)
            if not data:  # end of file: a TUN queue never reads empty
                return packets, "end of file"
            if not vnet:
                packets.append(data)
            elif self._add_split(data, packets, limit):
                break
        return packets, None

    def _add_split(self, data: bytes, packets: list[bytes], limit: int) -> bool:
        """The IP packets of one read with a virtio_net_hdr added to `packets` (what exceeds `limit` kept in
        `carry`); a read `split` refuses is counted and dropped. True once the batch is full (nothing more is
        read into it)."""
        try:
            pieces = split(data)
        except BadVnet:
            c = self._counters
            c.tun_rx_packets += 1
            c.tun_rx_bytes += len(data)
            c.drops[DropReason.TUN_BAD_VNET] += 1
            return False
        if len(pieces) > 1:
            self.gso_split += 1
            self.gso_segments += len(pieces)
        room = limit - len(packets)
        packets += pieces[:room]
        self.carry = pieces[room:]
        return len(packets) >= limit

    def write(self, packet: Any) -> None:
        """Write one packet now (an ICMP error of the worker's own)."""
        self._write([PLAIN_HEADER, packet] if self.mode.vnet else [packet], (packet,))

    def queue(self, packet: Any) -> None:
        """A packet from the peer: written now, or with offloads at the next `flush` (coalesced)."""
        if self.mode.offload:
            self._pending.append(packet)
        else:
            self.write(packet)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for buffers, packets in coalesce(pending, self._local):
            # Merged for a local address: the checksum left to the kernel, without NEEDS_CSUM (docs/worker.md).
            kernel_checked = len(packets) > 1 and not buffers[0][0] & NEEDS_CSUM
            error = self._write(buffers, packets, refusable=kernel_checked)
            if error == errno.EINVAL and kernel_checked:
                # A kernel that refuses such a super-packet: its packets one by one, and from now on only
                # merges this worker checked itself. Nothing is lost.
                log.warning("tun_gro_fallback", reason="the kernel refused a super-packet without NEEDS_CSUM; "
                                                       "checksums are verified by the worker from now on")
                self._local = frozenset()
                self.gro_fallback = 1
                for packet in packets:
                    self._write([PLAIN_HEADER, packet], (packet,))
            elif not error and len(packets) > 1:
                self.gro_writes += 1
                self.gro_merged += len(packets)

    def _write(self, buffers: list[Any], packets: Any, *, refusable: bool = False) -> int:
        """0 once written, else the errno (the packets counted as dropped, unless `refusable` and EINVAL:
        the caller writes them again)."""
        try:
            os.writev(self.fd, buffers)
        except OSError as exc:
            if refusable and exc.errno == errno.EINVAL:
                return exc.errno
            reason = DropReason.TUN_WRITE_EAGAIN if exc.errno in (errno.EAGAIN, errno.ENOBUFS) \
                else DropReason.TUN_WRITE_ERROR
            self._counters.drops[reason] += len(packets)
            return exc.errno or errno.EIO
        for packet in packets:
            self._written(packet)
        return 0
