"""The 16-byte L3PTP DATAGRAM header (seed roadmap, "Data Plane").

Each QUIC DATAGRAM carries exactly one IP packet behind this header. All
fields are in network byte order::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |   type=0x03   | version=0x01  |          header_len           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                      datagram_context_id                      |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                        packet_sequence                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |     flags     |  ip_version   |          payload_len          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    |                  raw IP packet (payload_len)                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

* ``type`` is HEADER_TYPE_IP (an IP packet follows); ``version`` is
  HEADER_VERSION. Anything else is rejected.
* ``header_len`` is the offset of the IP packet. This version always sends
  HEADER_LEN (16). **Forward compatibility:** a future header version of the
  same ``type``/``version`` may append fields after ``payload_len`` and raise
  ``header_len`` accordingly; receivers accept any ``header_len`` >= 16 that
  fits the datagram and skip the bytes they do not understand.
* ``datagram_context_id`` binds the packet to a session (from READY).
* ``packet_sequence`` is a per-sender u32 that wraps; it is used for loss
  metrics and debugging only.
* ``flags`` is reserved: senders set 0, receivers return it to the caller
  and do not reject unknown bits.
* ``ip_version`` must be 4 or 6 and equal the first nibble of the packet.
* ``payload_len`` must equal the number of bytes after ``header_len``.

Only the header is validated here; the inner IP packet is checked by
`l3ptp.worker.ippacket.check_ip_untrusted`. `parse_header_untrusted` raises
only `BadPacket` and never copies the payload.

Hot path: one precompiled `struct.Struct`, tuples rather than objects, no
logging.
"""

from __future__ import annotations

import struct

from l3ptp.ipc.constants import (
    HEADER_LEN,
    HEADER_TYPE_IP,
    HEADER_VERSION,
    IP_VERSION_4,
    IP_VERSION_6,
)
from l3ptp.ipc.counters import DropReason

__all__ = [
    "HEADER",
    "BadPacket",
    "encode_datagram",
    "pack_header",
    "parse_header_untrusted",
]

#: type, version, header_len, datagram_context_id, packet_sequence, flags,
#: ip_version, payload_len.
HEADER = struct.Struct("!BBHIIBBH")
assert HEADER.size == HEADER_LEN

_SEQUENCE_MASK = 0xFFFFFFFF
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class BadPacket(Exception):
    """A DATAGRAM from the peer failed validation; count `reason` and drop it."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


def pack_header(
    context_id: int,
    sequence: int,
    ip_version: int,
    payload_len: int,
    flags: int = 0,
) -> bytes:
    """Return the 16-byte header for these fields.

    `sequence` is taken modulo 2**32 so callers may use a free-running
    counter. Other out-of-range fields are programming errors and raise
    `struct.error`.
    """
    return _pack(
        HEADER_TYPE_IP,
        HEADER_VERSION,
        HEADER_LEN,
        context_id,
        sequence & _SEQUENCE_MASK,
        flags,
        ip_version,
        payload_len,
    )


def encode_datagram(context_id: int, sequence: int, packet: bytes | memoryview) -> bytes:
    """Return header + `packet` as one DATAGRAM payload.

    ``ip_version`` comes from the packet's first nibble; the packet itself
    is expected to have passed `check_ip_untrusted` already. An empty packet
    raises `ValueError`. `sequence` wraps as in `pack_header`.
    """
    if not packet:
        raise ValueError("cannot encode an empty packet")
    # bytes + buffer allocates the result once; the 16-byte header is the
    # only temporary.
    return (
        _pack(
            HEADER_TYPE_IP,
            HEADER_VERSION,
            HEADER_LEN,
            context_id,
            sequence & _SEQUENCE_MASK,
            0,
            packet[0] >> 4,
            len(packet),
        )
        + packet
    )


def parse_header_untrusted(
    buf: bytes | bytearray | memoryview,
) -> tuple[int, int, int, int, memoryview]:
    """Validate a DATAGRAM payload from the peer.

    Returns ``(context_id, sequence, flags, ip_version, payload)`` where
    `payload` is a memoryview slice of `buf` (no copy) holding exactly
    ``payload_len`` bytes. Raises only `BadPacket`:

    * DGRAM_BAD_HEADER: shorter than 16 bytes, wrong type or version,
      ``header_len`` < 16 or beyond the datagram, ``payload_len`` not equal
      to the bytes after ``header_len``;
    * DGRAM_BAD_IP_VERSION: ``ip_version`` not 4 or 6, empty payload, or
      ``ip_version`` not equal to the payload's first nibble.

    `buf` must be a one-dimensional byte buffer (what aioquic delivers).
    """
    size = len(buf)
    if size < HEADER_LEN:
        raise BadPacket(DropReason.DGRAM_BAD_HEADER, "short datagram")
    kind, version, header_len, context_id, sequence, flags, ip_version, payload_len = (
        _unpack_from(buf)
    )
    if kind != HEADER_TYPE_IP or version != HEADER_VERSION:
        raise BadPacket(DropReason.DGRAM_BAD_HEADER, "unknown type or version")
    if header_len < HEADER_LEN or header_len > size:
        raise BadPacket(DropReason.DGRAM_BAD_HEADER, "bad header_len")
    if payload_len != size - header_len:
        raise BadPacket(DropReason.DGRAM_BAD_HEADER, "payload_len mismatch")
    if ip_version != IP_VERSION_4 and ip_version != IP_VERSION_6:
        raise BadPacket(DropReason.DGRAM_BAD_IP_VERSION, "unsupported ip_version")
    if not payload_len:
        raise BadPacket(DropReason.DGRAM_BAD_IP_VERSION, "empty payload")
    if buf[header_len] >> 4 != ip_version:
        raise BadPacket(DropReason.DGRAM_BAD_IP_VERSION, "ip_version mismatch")
    if type(buf) is not memoryview:
        buf = memoryview(buf)
    return context_id, sequence, flags, ip_version, buf[header_len:]
