"""TUN offloads, read side: the virtio_net_hdr in front of every packet of an IFF_VNET_HDR TUN, the Internet
checksum, and the split of a TSO super-packet into the IP packets the peer gets. Pure.

A TUN created with IFF_VNET_HDR prefixes every packet read and written with a 10-byte `struct virtio_net_hdr`
(include/uapi/linux/virtio_net.h, little-endian): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
Once the worker enabled TUNSETOFFLOAD (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6), the kernel hands it

* TCP super-packets (gso_type TCPV4/TCPV6) of up to 64 KiB: one IP and TCP header, then gso_size bytes of
  payload per segment, the last possibly shorter, with the TCP checksum left to be done (NEEDS_CSUM);
* ordinary packets (gso_type NONE) whose transport checksum is still partial (NEEDS_CSUM: the one's
  complement sum from csum_start, seeded with the pseudo-header sum the kernel put at csum_start+csum_offset).

`split` turns either into complete IP packets with correct checksums, as the kernel's own segmentation would
(`tcp_gso_segment`; wireguard-go `tun/offload_linux.go` `gsoSplit`): each segment gets the IP total/payload
length, IPv4 the next identification and a new header checksum, TCP its sequence number advanced by the payload
before it, FIN and PSH only on the last segment, and its checksum over the pseudo-header. The wire is
unchanged: one segment per DATAGRAM, each checked against the tunnel MTU by `Datapath` like any packet read.

The header and the bytes are outside input (a local process chooses what it sends; a kernel bug, a fuzzer):
nothing here trusts hdr_len, csum_start or the IP lengths. The IP and TCP headers are read from the packet
itself; anything this module does not understand (ECN-flagged or UDP GSO, IPv6 extension headers, IPv4
fragments, lengths that do not add up, a checksum position outside the packet) is `BadVnet`, counted by the
caller as `tun_bad_vnet` and dropped.
"""

from __future__ import annotations

import struct

from . import native

__all__ = [
    "GSO_NONE", "GSO_TCPV4", "GSO_TCPV6", "NEEDS_CSUM", "PLAIN_HEADER", "VNET_HDR_LEN", "BadVnet",
    "checksum", "encode_header", "fold", "ones_sum", "split",
]

VNET_HDR_LEN = 10
_HDR = struct.Struct("<BBHHHH")
NEEDS_CSUM = 0x01
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
#: The header written in front of a packet that is neither coalesced nor partial.
PLAIN_HEADER = bytes(VNET_HDR_LEN)
PROTO_TCP, PROTO_UDP = 6, 17
#: At most this many segments per super-packet (the smallest MSS Linux allows, 88 bytes, makes 745 of 64 KiB).
MAX_SEGMENTS = 1024
IPV6_HEADER = 40
TCP_MIN_HEADER = 20
TCP_FIN, TCP_PSH = 0x01, 0x08
_H, _HH, _SEQ = struct.Struct("!H"), struct.Struct("!HH"), struct.Struct("!I")
#: Largest IP packet: the IPv4 total length and IPv6 payload length fields are 16 bits.
IP_MAX = 65535


class BadVnet(ValueError):
    """A packet read from an IFF_VNET_HDR TUN that cannot be turned into IP packets (counted, dropped)."""


def py_ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's complement sum of `data` as big-endian words (odd length: a zero byte after), folded:
    0 only for all-zero data. A 16-bit big-endian word sum is congruent to the number modulo 0xFFFF
    (65536 = 1 mod 65535), so one `int.from_bytes` does the whole sum in C."""
    n = int.from_bytes(data, "big") << (8 * (len(data) & 1))
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and n else s


#: `py_ones_sum`, in C where the worker's native module is built (worker/native.py).
ones_sum = native.fastpath.ones_sum if native.fastpath is not None else py_ones_sum


def fold(*sums: int) -> int:
    """One's complement sum of partial sums (each 0..0xFFFF)."""
    s = sum(sums)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(*sums: int) -> int:
    """The Internet checksum (RFC 1071) of data whose partial sums are `sums`."""
    return ~fold(*sums) & 0xFFFF


def encode_header(gso_type: int = GSO_NONE, *, flags: int = 0, hdr_len: int = 0, gso_size: int = 0,
                  csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return _HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def pseudo_sum(ip: bytes | memoryview, version: int, length: int) -> int:
    """The partial sum of the TCP pseudo-header of `ip` (its addresses) for a TCP segment of `length` bytes."""
    addresses = ip[12:20] if version == 4 else ip[8:40]
    return fold(ones_sum(addresses), PROTO_TCP, length & 0xFFFF, length >> 16)


def ip_tcp_offsets(packet: bytes | memoryview) -> tuple[int, int, int]:
    """(IP version, IP header length, TCP header length) of an unfragmented IPv4 or IPv6 TCP packet without
    extension headers, read from the packet alone; BadVnet otherwise."""
    size = len(packet)
    if size < 1:
        raise BadVnet("empty")
    version = packet[0] >> 4
    if version == 4:
        iphl = (packet[0] & 0x0F) * 4
        if iphl < 20 or size < iphl or packet[9] != PROTO_TCP:
            raise BadVnet("IPv4 header")
        if int.from_bytes(packet[6:8], "big") & 0x3FFF:  # MF or a fragment offset
            raise BadVnet("IPv4 fragment")
    elif version == 6:
        iphl = IPV6_HEADER
        if size < iphl or packet[6] != PROTO_TCP:
            raise BadVnet("IPv6 header (extension headers are not split)")
    else:
        raise BadVnet("IP version")
    if size < iphl + TCP_MIN_HEADER:
        raise BadVnet("TCP header")
    tcphl = (packet[iphl + 12] >> 4) * 4
    if tcphl < TCP_MIN_HEADER or size < iphl + tcphl:
        raise BadVnet("TCP header length")
    return version, iphl, tcphl


def ip_header(ip: bytes | memoryview, version: int, total: int, ident_add: int) -> bytes:
    """A copy of IP header `ip` for a packet of `total` bytes: lengths set; IPv4: identification + `ident_add`
    and the header checksum."""
    if version == 6:
        return b"".join((ip[:4], (total - IPV6_HEADER).to_bytes(2, "big"), ip[6:]))
    ident = (int.from_bytes(ip[4:6], "big") + ident_add) & 0xFFFF
    head = b"".join((ip[:2], total.to_bytes(2, "big"), ident.to_bytes(2, "big"), ip[6:10], b"\0\0", ip[12:]))
    return b"".join((head[:10], checksum(ones_sum(head)).to_bytes(2, "big"), head[12:]))


def _protocol(packet: bytes) -> int:
    version = packet[0] >> 4
    return packet[9] if version == 4 and len(packet) >= 20 else packet[6] if version == 6 and len(packet) >= 40 else -1


def _complete(packet: bytes, start: int, offset: int) -> bytes:
    """Finish a partial checksum (NEEDS_CSUM, no GSO): the sum from `start`, seeded by the field's contents."""
    at = start + offset
    if offset < 0 or at + 2 > len(packet) or start >= len(packet):
        raise BadVnet("checksum position outside the packet")
    value = checksum(ones_sum(memoryview(packet)[start:]))
    if value == 0 and _protocol(packet) == PROTO_UDP:  # UDP sends a computed 0 as 0xFFFF (0: no checksum)
        value = 0xFFFF
    return b"".join((packet[:at], value.to_bytes(2, "big"), packet[at + 2:]))


def split(data: bytes) -> list[bytes]:
    """The IP packets in `data` (a virtio_net_hdr and what follows it, as read from the TUN): one packet, or the
    segments of a TCP super-packet. BadVnet for anything else."""
    if len(data) <= VNET_HDR_LEN:
        raise BadVnet("shorter than a virtio_net_hdr and an IP header")
    if data[:2] == b"\0\0":  # the common case: no flags, no GSO
        return [data[VNET_HDR_LEN:]]
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(data)
    packet = data[VNET_HDR_LEN:]
    if gso_type == GSO_NONE:
        return [_complete(packet, csum_start, csum_offset) if flags & NEEDS_CSUM else packet]
    if gso_type not in (GSO_TCPV4, GSO_TCPV6):
        raise BadVnet(f"gso_type {gso_type}")
    if len(packet) > IP_MAX + IPV6_HEADER:
        raise BadVnet("super-packet over 64 KiB")
    version, iphl, tcphl = ip_tcp_offsets(packet)
    if version != (4 if gso_type == GSO_TCPV4 else 6):
        raise BadVnet("gso_type does not match the IP version")
    if gso_size == 0 or len(packet) - iphl - tcphl > gso_size * MAX_SEGMENTS:
        raise BadVnet("gso_size 0 or too small for the payload")
    return _segments(packet, version, iphl, tcphl, gso_size)


def _segments(packet: bytes, version: int, iphl: int, tcphl: int, gso: int) -> list[bytes]:
    """The segments of a TCP super-packet. The header sums are computed once without the fields that change
    (lengths, IPv4 identification, TCP sequence and flags) and completed per segment by arithmetic; only each
    payload chunk is summed (one `int.from_bytes`)."""
    ip, tcp, payload = packet[:iphl], packet[iphl:iphl + tcphl], memoryview(packet)[iphl + tcphl:]
    seq, offset, flags = int.from_bytes(tcp[4:8], "big"), tcp[12], tcp[13]
    # TCP: everything but sequence, data offset + flags and checksum; plus the pseudo-header's addresses and protocol.
    tcp_sum = fold(ones_sum(tcp[:4]), ones_sum(tcp[8:12]), ones_sum(tcp[14:16]), ones_sum(tcp[18:]), PROTO_TCP,
                   ones_sum(ip[12:20] if version == 4 else ip[8:40]))
    if version == 4:  # everything but total length, identification and checksum
        ident, ip_sum = int.from_bytes(ip[4:6], "big"), fold(ones_sum(ip[:2]), ones_sum(ip[6:10]), ones_sum(ip[12:]))
        ip_head, ip_mid, ip_tail = ip[:2], ip[6:10], ip[12:]
    else:
        ip_head, ip_tail = ip[:4], ip[6:]
    tcp_head, tcp_mid, tcp_win, tcp_tail = tcp[:4], tcp[8:12], tcp[14:16], tcp[18:]
    count = -(-len(payload) // gso) or 1
    out = []
    for i in range(count):
        chunk = payload[i * gso:(i + 1) * gso]
        length = tcphl + len(chunk)
        s = (seq + i * gso) & 0xFFFFFFFF
        word = offset << 8 | (flags if i == count - 1 else flags & ~(TCP_FIN | TCP_PSH))
        csum = ~fold(tcp_sum, length, s >> 16, s & 0xFFFF, word, ones_sum(chunk)) & 0xFFFF
        tcp_part = (tcp_head, _SEQ.pack(s), tcp_mid, _H.pack(word), tcp_win, _H.pack(csum), tcp_tail, chunk)
        if version == 4:
            total, segment_id = iphl + length, (ident + i) & 0xFFFF
            out.append(b"".join((ip_head, _HH.pack(total, segment_id), ip_mid,
                                 _H.pack(~fold(ip_sum, total, segment_id) & 0xFFFF), ip_tail, *tcp_part)))
        else:
            out.append(b"".join((ip_head, _H.pack(length), ip_tail, *tcp_part)))
    return out
