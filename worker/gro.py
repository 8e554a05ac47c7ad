"""TUN offloads, write side: TCP packets from the peer coalesced into super-packets before they are written to
an IFF_VNET_HDR TUN (GRO in user space, as wireguard-go `tun/offload_linux.go` `tcpGRO`). Pure.

The host's stack then handles one 64 KiB packet where it would have handled up to 45 of 1280 bytes (one trip
through netfilter, routing and TCP, one ACK decision). Only what the kernel's own GRO (`tcp_gro_receive`) would
merge is merged, and only within one batch handed to `coalesce` (what one UDP wake-up of the worker received):

* IPv4 without options and not a fragment, or IPv6 without extension headers; TCP with a payload, flags ACK and
  at most PSH; IP and TCP lengths that match the packet; a valid IPv4 header checksum (the merged packet gets a
  new IPv4 header) and a valid TCP checksum. A packet with a bad checksum must never be "repaired" by merging.
  Two ways ensure it, by destination:
  - to one of `local` (the TUN's own addresses: delivered on this host), the worker does not sum payloads.
    Each segment's checksum field gives the sum its sender claimed for its payload (RFC 1071 sums add up), and
    the merged packet carries the sum of those claims in a complete TCP checksum, without NEEDS_CSUM: the
    kernel verifies it over the whole super-packet before TCP takes it (`tcp_checksum_complete`, in C) and
    drops all of it if any segment was corrupted (counted by the kernel as InCsumErrors), as it would have
    dropped that segment;
  - to anywhere else (routed on: a forwarded super-packet is re-segmented with fresh checksums, never
    verified), each segment's TCP checksum is verified here and the merged packet goes with NEEDS_CSUM;
* the same flow (addresses, ports), the same ACK number, window, TCP options, IPv4 TOS, TTL and DF or IPv6
  first word and hop limit, the next sequence number (IPv4: and the next identification, as a sender's
  segmentation makes them), the first packet's payload size (the last one may be shorter, and nothing follows
  it or a packet with PSH), at most 65535 bytes of IP packet.

Anything else is written as it came, behind a zero virtio_net_hdr, after its flow's open super-packet is closed
(a FIN or a pure ACK of a flow never overtakes data of that flow written before it). A merged packet carries
the first packet's headers with the total length (IPv4: a new header checksum), PSH if the last had it, and a
header gso_type TCPV4/TCPV6, gso_size = the segment payload; to a local address the complete TCP checksum and no
flags, elsewhere the TCP pseudo-header sum in the checksum field, csum_start = the IP header length,
csum_offset = 16, NEEDS_CSUM.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence

from . import native
from .vnet import (
    GSO_TCPV4, GSO_TCPV6, IP_MAX, IPV6_HEADER, NEEDS_CSUM, PLAIN_HEADER, PROTO_TCP, TCP_PSH, BadVnet, encode_header,
    checksum, fold, ip_header, ip_tcp_offsets, ones_sum, pseudo_sum,
)

__all__ = ["coalesce"]

TCP_ACK = 0x10
_TCP_CHECK = 16
#: The fixed IPv4 (no options) or IPv6 header and the first 16 bytes of TCP, read at once by `_parse`'s fast path.
_V4 = struct.Struct("!BBHHHBBH8xHHIIBBH")
_V6 = struct.Struct("!4xHBB32xHHIIBBH")

Packet = bytes | memoryview


class _Item:
    """An open super-packet: its packets, the next sequence number, the segment size, the IP length so far."""

    __slots__ = ("packets", "match", "version", "iphl", "tcphl", "gso", "next_seq", "next_id", "total", "closed",
                 "psh", "claimed")

    def __init__(self, packet: Packet, match: bytes, version: int, iphl: int, tcphl: int, payload: int,
                 seq: int, ident: int, psh: bool, claimed: int | None) -> None:
        self.packets = [packet]
        #: Local destination: the sum of the payload sums the segments' checksums claim; None: verified here.
        self.claimed = claimed
        self.match, self.version, self.iphl, self.tcphl = match, version, iphl, tcphl
        self.gso, self.next_seq, self.total = payload, (seq + payload) & 0xFFFFFFFF, len(packet)
        self.next_id = (ident + (version == 4)) & 0xFFFF  # IPv6 has none: always 0
        self.closed, self.psh = psh, psh

    def append(self, packet: Packet, match: bytes, payload: int, seq: int, ident: int, psh: bool,
               claimed: int | None) -> bool:
        if (self.closed or match != self.match or seq != self.next_seq or ident != self.next_id
                or payload > self.gso or self.total + payload > IP_MAX + (IPV6_HEADER if self.version == 6 else 0)):
            return False
        if (self.claimed is None) != (claimed is None):  # never within one flow; checked, not assumed
            return False
        if self.claimed is not None and claimed is not None:
            if (self.total - self.iphl - self.tcphl) & 1:  # this payload starts at an odd offset in the merged one
                claimed = ((claimed << 8) | (claimed >> 8)) & 0xFFFF
            total = self.claimed + claimed  # fold() of the two, inline (hot path)
            self.claimed = total - 0xFFFF if total > 0xFFFF else total
        self.packets.append(packet)
        self.next_seq, self.total = (seq + payload) & 0xFFFFFFFF, self.total + payload
        self.next_id = (ident + (self.version == 4)) & 0xFFFF
        self.closed, self.psh = psh or payload < self.gso, psh
        return True

    def encode(self) -> list[Packet]:
        """The buffers of one write: the virtio_net_hdr, then the packet (several parts, for `os.writev`)."""
        if len(self.packets) == 1:
            return [PLAIN_HEADER, self.packets[0]]
        head = memoryview(self.packets[0])
        iphl, tcphl, version = self.iphl, self.tcphl, self.version
        hl = iphl + tcphl
        ip = ip_header(head[:iphl], version, self.total, 0)
        tcp = bytearray(head[iphl:hl])
        if self.psh:
            tcp[13] |= TCP_PSH
        gso_type = GSO_TCPV4 if version == 4 else GSO_TCPV6
        if self.claimed is not None:  # complete: verified by the kernel over the whole super-packet
            tcp[_TCP_CHECK:_TCP_CHECK + 2] = b"\0\0"
            check = checksum(pseudo_sum(ip, version, self.total - iphl), ones_sum(tcp), self.claimed)
            tcp[_TCP_CHECK:_TCP_CHECK + 2] = check.to_bytes(2, "big")
            header = encode_header(gso_type, hdr_len=hl, gso_size=self.gso)
        else:
            tcp[_TCP_CHECK:_TCP_CHECK + 2] = pseudo_sum(ip, version, self.total - iphl).to_bytes(2, "big")
            header = encode_header(gso_type, flags=NEEDS_CSUM, hdr_len=hl, gso_size=self.gso, csum_start=iphl,
                                   csum_offset=_TCP_CHECK)
        return [header, ip, bytes(tcp), *(memoryview(p)[hl:] for p in self.packets)]


Parsed = tuple[bytes, bytes, int, int, int, int, int, int, bool, int | None]


def _parse(packet: Packet, local: Collection[bytes]) -> Parsed | None:
    """(flow, match, version, iphl, tcphl, payload, seq, IPv4 identification or 0, psh, claimed) of a packet that
    may be merged, `claimed` the payload sum its checksum claims when its destination is in `local` (else None,
    its checksum verified); None otherwise.
    `flow` is also returned (as the first item, `match` empty) for any other TCP packet, to close its flow.

    The common case, a packet that may merge, is read with one `struct` call; anything else (and anything
    that fails a check on the way) is left to `_parse_any`, which gives the same answer for every packet
    (tests/fuzz/test_fuzz_offload.py compares the two)."""
    size = len(packet)
    if size < 60:
        return _parse_any(packet, local)
    first = packet[0]
    if packet[9 if first >> 4 == 4 else 6] != PROTO_TCP:  # UDP, ICMP, ...: nothing to merge, nothing copied
        return None
    p = packet if isinstance(packet, bytes) else bytes(packet)  # one copy; slices of bytes are bytes
    if first == 0x45:  # IPv4 without options
        _, tos, total, ident, frag, ttl, proto, _, _, _, seq, _, off, flags, _ = _V4.unpack_from(p)
        tcphl = (off >> 4) * 4
        if (proto != PROTO_TCP or frag & 0x3FFF or total != size or tcphl < 20 or size <= 20 + tcphl
                or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK
                or int.from_bytes(p[:20], "big") % 0xFFFF):  # header sum not 0xFFFF (it is never 0)
            return _parse_any(packet, local)
        iphl, version, ip_match, dst, flow = 20, 4, bytes((tos, ttl, frag >> 8 & 0x40)), p[16:20], p[12:24]
        pseudo_from = 12
    elif first >> 4 == 6:
        plen, nxt, _, _, _, seq, _, off, flags, _ = _V6.unpack_from(p)
        tcphl = (off >> 4) * 4
        if (nxt != PROTO_TCP or plen + IPV6_HEADER != size or tcphl < 20 or size <= 40 + tcphl
                or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK):
            return _parse_any(packet, local)
        iphl, version, ident, ip_match, dst, flow = 40, 6, 0, p[0:4] + p[7:8], p[24:40], p[8:44]
        pseudo_from = 8
    else:
        return _parse_any(packet, local)
    end = iphl + tcphl
    claimed = None
    if dst in local:  # = 0xFFFF - fold(ones_sum(p[pseudo_from:end]), PROTO_TCP, size - iphl), inline (never 0, even)
        claimed = 0xFFFF - ((int.from_bytes(p[pseudo_from:end], "big") + PROTO_TCP + size - iphl) % 0xFFFF or 0xFFFF)
    elif (ones_sum(p[pseudo_from:]) + PROTO_TCP + size - iphl) % 0xFFFF:  # the fold is not 0xFFFF
        return _parse_any(packet, local)
    match = ip_match + p[iphl + 8:iphl + 13] + p[iphl + 14:iphl + 16] + p[iphl + 20:end]
    return flow, match, version, iphl, tcphl, size - end, seq, ident, bool(flags & TCP_PSH), claimed


def _parse_any(packet: Packet, local: Collection[bytes]) -> Parsed | None:
    """`_parse` for any packet, field by field."""
    if len(packet) < 40 or packet[9 if packet[0] >> 4 == 4 else 6] != PROTO_TCP:  # not TCP (IPv4 or IPv6)
        return None
    p = packet if isinstance(packet, bytes) else bytes(packet)  # one copy; slices of bytes are bytes
    try:
        version, iphl, tcphl = ip_tcp_offsets(p)
    except BadVnet:
        return None
    size, tcp = len(p), iphl
    if version == 4:
        flow = p[12:20] + p[tcp:tcp + 4]
        fits = iphl == 20 and int.from_bytes(p[2:4], "big") == size and ones_sum(p[:20]) == 0xFFFF
        ip_match, ident, pseudo_from = bytes((p[1], p[8], p[6] & 0x40)), int.from_bytes(p[4:6], "big"), 12
        dst = p[16:20]
    else:
        flow = p[8:40] + p[tcp:tcp + 4]
        fits = int.from_bytes(p[4:6], "big") + IPV6_HEADER == size
        ip_match, ident, pseudo_from = p[0:4] + p[7:8], 0, 8
        dst = p[24:40]
    payload = size - iphl - tcphl
    flags = p[tcp + 13]
    if not fits or payload <= 0 or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
        return flow, b"", version, iphl, tcphl, 0, 0, 0, False, None
    # The pseudo-header's addresses and the TCP segment are contiguous (no IPv4 options here): one sum.
    claimed = None
    if dst in local:  # what the payload sums to if the checksum is right: minus the rest of the sum
        claimed = 0xFFFF - fold(ones_sum(p[pseudo_from:tcp + tcphl]), PROTO_TCP, size - iphl)
    elif fold(ones_sum(p[pseudo_from:]), PROTO_TCP, size - iphl) != 0xFFFF:
        return flow, b"", version, iphl, tcphl, 0, 0, 0, False, None
    # Everything that must be equal to merge: IP fields, ACK number, data offset + window, options.
    match = ip_match + p[tcp + 8:tcp + 13] + p[tcp + 14:tcp + 16] + p[tcp + 20:tcp + tcphl]
    seq = int.from_bytes(p[tcp + 4:tcp + 8], "big")
    return flow, match, version, iphl, tcphl, payload, seq, ident, bool(flags & TCP_PSH), claimed


#: `_parse`, in C where the worker's native module is built (worker/native.py); False: ask `_parse_any`.
_fast_parse = native.fastpath.gro_parse if native.fastpath is not None else _parse


def coalesce(packets: Sequence[Packet], local: Collection[bytes] = ()) -> list[tuple[list[Packet], list[Packet]]]:
    """The writes for `packets`, in order: (the buffers of one write, the packets it carries). `local`: the
    packed addresses delivered on this host (the TUN's own), whose super-packets the kernel verifies."""
    out: list[_Item | Packet] = []
    open_items: dict[bytes, _Item] = {}
    parse, parse_any = _fast_parse, _parse_any
    for packet in packets:
        parsed = parse(packet, local)
        if parsed is False:  # the C fast path's "not a plain segment": `_parse` would ask `_parse_any` too
            parsed = parse_any(packet, local)
        if parsed is None:
            out.append(packet)
            continue
        flow, match, version, iphl, tcphl, payload, seq, ident, psh, claimed = parsed
        item = open_items.get(flow)
        if not match:  # not mergeable: the flow's open super-packet ends before it
            open_items.pop(flow, None)
            out.append(packet)
        elif item is None or not item.append(packet, match, payload, seq, ident, psh, claimed):
            open_items[flow] = item = _Item(packet, match, version, iphl, tcphl, payload, seq, ident, psh, claimed)
            out.append(item)
    return [(entry.encode(), entry.packets) if isinstance(entry, _Item) else ([PLAIN_HEADER, entry], [entry])
            for entry in out]
