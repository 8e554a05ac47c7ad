"""TUN offloads, write side: TCP packets from the peer coalesced into super-packets before they are written to
an IFF_VNET_HDR TUN (GRO in user space, as wireguard-go `tun/offload_linux.go` `tcpGRO`). Pure.

The host's stack then handles one 64 KiB packet where it would have handled up to 45 of 1280 bytes (one trip
through netfilter, routing and TCP, one ACK decision). Only what the kernel's own GRO (`tcp_gro_receive`) would
merge is merged, and only within one batch handed to `coalesce` (what one UDP wake-up of the worker received):

* IPv4 without options and not a fragment, or IPv6 without extension headers; TCP with a payload, flags ACK and
  at most PSH; IP and TCP lengths that match the packet; a valid IPv4 header checksum and a valid TCP checksum
  (the merged packet goes up with NEEDS_CSUM, which the kernel trusts, and a new IPv4 header: a packet with a
  bad checksum must never be "repaired" by merging; it is written on its own and the kernel drops it);
* the same flow (addresses, ports), the same ACK number, window, TCP options, IPv4 TOS, TTL and DF or IPv6
  first word and hop limit, the next sequence number (IPv4: and the next identification, as a sender's
  segmentation makes them), the first packet's payload size (the last one may be shorter, and nothing follows
  it or a packet with PSH), at most 65535 bytes of IP packet.

Anything else is written as it came, behind a zero virtio_net_hdr, after its flow's open super-packet is closed
(a FIN or a pure ACK of a flow never overtakes data of that flow written before it). A merged packet carries
the first packet's headers with the total length (IPv4: a new header checksum), PSH if the last had it, the
TCP pseudo-header sum in the checksum field, and a header gso_type TCPV4/TCPV6, gso_size = the segment
payload, csum_start = the IP header length, csum_offset = 16, NEEDS_CSUM.
"""

from __future__ import annotations

from collections.abc import Sequence

from .vnet import (
    GSO_TCPV4, GSO_TCPV6, IP_MAX, IPV6_HEADER, NEEDS_CSUM, PLAIN_HEADER, PROTO_TCP, TCP_PSH, BadVnet, encode_header,
    fold, ip_header, ip_tcp_offsets, ones_sum, pseudo_sum,
)

__all__ = ["coalesce"]

TCP_ACK = 0x10
_TCP_CHECK = 16

Packet = bytes | memoryview


class _Item:
    """An open super-packet: its packets, the next sequence number, the segment size, the IP length so far."""

    __slots__ = ("packets", "match", "version", "iphl", "tcphl", "gso", "next_seq", "next_id", "total", "closed",
                 "psh")

    def __init__(self, packet: Packet, match: bytes, version: int, iphl: int, tcphl: int, payload: int,
                 seq: int, ident: int, psh: bool) -> None:
        self.packets = [packet]
        self.match, self.version, self.iphl, self.tcphl = match, version, iphl, tcphl
        self.gso, self.next_seq, self.total = payload, (seq + payload) & 0xFFFFFFFF, len(packet)
        self.next_id = (ident + (version == 4)) & 0xFFFF  # IPv6 has none: always 0
        self.closed, self.psh = psh, psh

    def append(self, packet: Packet, match: bytes, payload: int, seq: int, ident: int, psh: bool) -> bool:
        if (self.closed or match != self.match or seq != self.next_seq or ident != self.next_id
                or payload > self.gso or self.total + payload > IP_MAX + (IPV6_HEADER if self.version == 6 else 0)):
            return False
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
        tcp[_TCP_CHECK:_TCP_CHECK + 2] = pseudo_sum(ip, version, self.total - iphl).to_bytes(2, "big")
        header = encode_header(GSO_TCPV4 if version == 4 else GSO_TCPV6, flags=NEEDS_CSUM, hdr_len=hl,
                               gso_size=self.gso, csum_start=iphl, csum_offset=_TCP_CHECK)
        return [header, ip, bytes(tcp), *(memoryview(p)[hl:] for p in self.packets)]


def _parse(packet: Packet) -> tuple[bytes, bytes, int, int, int, int, int, int, bool] | None:
    """(flow, match, version, iphl, tcphl, payload, seq, IPv4 identification or 0, psh) of a packet that may be
    merged; None otherwise.
    `flow` is also returned (as the first item, `match` empty) for any other TCP packet, to close its flow."""
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
    else:
        flow = p[8:40] + p[tcp:tcp + 4]
        fits = int.from_bytes(p[4:6], "big") + IPV6_HEADER == size
        ip_match, ident, pseudo_from = p[0:4] + p[7:8], 0, 8
    payload = size - iphl - tcphl
    flags = p[tcp + 13]
    # The TCP checksum over the pseudo-header: the addresses and the segment are contiguous, one sum.
    if (not fits or payload <= 0 or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK
            or fold(ones_sum(p[pseudo_from:]), PROTO_TCP, size - iphl) != 0xFFFF):
        return flow, b"", version, iphl, tcphl, 0, 0, 0, False
    # Everything that must be equal to merge: IP fields, ACK number, data offset + window, options.
    match = ip_match + p[tcp + 8:tcp + 13] + p[tcp + 14:tcp + 16] + p[tcp + 20:tcp + tcphl]
    seq = int.from_bytes(p[tcp + 4:tcp + 8], "big")
    return flow, match, version, iphl, tcphl, payload, seq, ident, bool(flags & TCP_PSH)


def coalesce(packets: Sequence[Packet]) -> list[tuple[list[Packet], list[Packet]]]:
    """The writes for `packets`, in order: (the buffers of one write, the packets it carries)."""
    out: list[_Item | Packet] = []
    open_items: dict[bytes, _Item] = {}
    for packet in packets:
        parsed = _parse(packet)
        if parsed is None:
            out.append(packet)
            continue
        flow, match, version, iphl, tcphl, payload, seq, ident, psh = parsed
        item = open_items.get(flow)
        if not match:  # not mergeable: the flow's open super-packet ends before it
            open_items.pop(flow, None)
            out.append(packet)
        elif item is None or not item.append(packet, match, payload, seq, ident, psh):
            open_items[flow] = item = _Item(packet, match, version, iphl, tcphl, payload, seq, ident, psh)
            out.append(item)
    return [(entry.encode(), entry.packets) if isinstance(entry, _Item) else ([PLAIN_HEADER, entry], [entry])
            for entry in out]
