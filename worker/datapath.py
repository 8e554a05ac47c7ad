"""The data path: IP packets <-> L3PTP DATAGRAM payloads. Pure.

Pipeline (the shell in worker/tunnel.py moves the bytes)::

    TUN readable
      -> os.read until EAGAIN or TUN_READ_BATCH          [shell]
      -> from_tun_batch(packets, queue_depth):           [here]
           not established             -> tun_not_ready
           check_ip_untrusted(FROM_TUN, mtu=min(MTU, live budget))
                                       -> tun_bad_packet / tun_bad_ip_version /
                                          tun_oversize / tun_src_not_allowed
           tun_oversize, IPv4 without DF or options, allowed source:
                                       -> fragments that fit, queued instead
                                          (worker/oversize.py, `fragmented`)
           other tun_oversize, well-formed, allowed source:
                                       -> ICMP "too big" with the limit in
                                          `to_tun` (at most ICMP_TOO_BIG_RATE
                                          per second)
           queue_depth + queued >= DATAGRAM_QUEUE_MAX
                                       -> queue_full
           header + packet             -> returned payloads
      -> send_datagram_frame each, ONE datagrams_to_send [shell]

    DATAGRAM received
      -> from_peer(payload):                             [here]
           not established             -> dgram_not_ready
           parse_header_untrusted      -> dgram_bad_header / dgram_bad_ip_version
           context id != ours          -> dgram_unknown_context
           check_ip_untrusted(FROM_PEER) -> dgram_bad_ip / dgram_oversize /
                                          dgram_src_not_allowed
           -> packet for TUN
      -> os.write (non-blocking)        -> tun_write_eagain / tun_write_error [shell]

Every packet that is not forwarded is counted under exactly one
`DropReason`; there is no silent drop. An oversized packet is never queued,
because aioquic never sends a DATAGRAM that does not fit a packet and
stalls everything queued behind it. Counters live in one `Counters` object
that outlives sessions, so they survive reconnects.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from l3ptp.ipc.constants import DATAGRAM_QUEUE_MAX, HEADER_LEN, IP_VERSION_4
from l3ptp.ipc.counters import Counters, DropReason

from . import native
from .header import BadPacket, encode_datagram, parse_header_untrusted
from .oversize import fragment_v4, too_big
from .ippacket import _REASONS, Direction, PrefixSet, check_ip_untrusted

__all__ = ["Datapath"]

_SEQ_MASK = 0xFFFFFFFF
#: The checks and framing of one packet in C (worker/native.py), or None: `check_ip_untrusted` and
#: `encode_datagram` here. Their answers are indexes into these reasons.
_tun_frame = native.fastpath.tun_frame if native.fastpath is not None else None
_peer_packet = native.fastpath.peer_packet if native.fastpath is not None else None
_TUN_REASONS = _REASONS[Direction.FROM_TUN]
_PEER_REASONS = (DropReason.DGRAM_BAD_HEADER, DropReason.DGRAM_BAD_IP_VERSION, DropReason.DGRAM_UNKNOWN_CONTEXT,
                 *_REASONS[Direction.FROM_PEER])
#: ICMP "too big" errors a worker writes back per second at most (and its burst).
ICMP_TOO_BIG_RATE = 100.0


class Datapath:
    """Validation, framing and counting for one worker queue."""

    __slots__ = (
        "counters",
        "local_sources",
        "peer_sources",
        "mtu",
        "max_payload",
        "tx_context_id",
        "rx_context_id",
        "rx_previous",
        "established",
        "queue_max",
        "_seq",
        "peer_v4",
        "peer_v6",
        "to_tun",
        "icmp_too_big_sent",
        "fragmented",
        "_icmp_tokens",
        "_icmp_at",
        "_clock",
    )

    def __init__(
        self,
        *,
        local_sources: Iterable[str],
        peer_sources: Iterable[str],
        counters: Counters | None = None,
        queue_max: int = DATAGRAM_QUEUE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters if counters is not None else Counters()
        self.local_sources = PrefixSet(local_sources)
        self.peer_sources = PrefixSet(peer_sources)
        self.mtu = 0
        self.max_payload = 0
        self.tx_context_id = 0
        self.rx_context_id = 0
        #: The replaced session's context id, accepted while it retires (worker/renewal.py); -1: none.
        self.rx_previous = -1
        self.established = False
        self.queue_max = queue_max
        self._seq = 0
        #: The peer's tunnel addresses (packed), the source of our ICMP errors.
        self.peer_v4: bytes | None = None
        self.peer_v6: bytes | None = None
        #: ICMP errors to write to the TUN (the caller writes and clears them).
        self.to_tun: list[bytes] = []
        self.icmp_too_big_sent = 0
        #: IPv4 packets (DF clear) over the limit sent as fragments.
        self.fragmented = 0
        self._clock = clock
        self._icmp_tokens = ICMP_TOO_BIG_RATE
        self._icmp_at = clock()

    # ---- session lifecycle ------------------------------------------------

    def start_session(self, *, mtu: int, max_payload: int, tx_context_id: int, rx_context_id: int,
                      peer_addresses: Iterable[str] = (), keep_previous: bool = False) -> None:
        """Open the data path for a freshly established session; `keep_previous`: it replaces a session
        whose DATAGRAMs are still accepted until `rx_previous` is set back to -1."""
        self.rx_previous = self.rx_context_id if keep_previous and self.established else -1
        self.peer_v4 = self.peer_v6 = None
        for text in peer_addresses:
            ip = ipaddress.ip_interface(text).ip
            if ip.version == IP_VERSION_4:
                self.peer_v4 = ip.packed
            else:
                self.peer_v6 = ip.packed
        self.mtu = mtu
        self.max_payload = max_payload
        self.tx_context_id = tx_context_id
        self.rx_context_id = rx_context_id
        self.established = True
        self.counters.rx_sequence.reset()

    def stop_session(self) -> None:
        self.established = False

    def set_budget(self, max_payload: int) -> None:
        """Update the live DATAGRAM payload budget (the peer CID may change)."""
        self.max_payload = max_payload

    @property
    def packet_limit(self) -> int:
        """Largest inner packet that may be queued now."""
        return min(self.mtu, self.max_payload - HEADER_LEN)

    # ---- TUN -> peer ------------------------------------------------------

    def from_tun_batch(self, packets: Iterable[bytes], queue_depth: int) -> list[bytes]:
        """Validate and frame packets read from TUN; return DATAGRAM payloads.

        `queue_depth` is how many DATAGRAMs already wait in the QUIC layer.
        """
        c = self.counters
        drops = c.drops
        out: list[bytes] = []
        if not self.established:
            for packet in packets:
                c.tun_rx_packets += 1
                c.tun_rx_bytes += len(packet)
                drops[DropReason.TUN_NOT_READY] += 1
            return out
        limit = self.packet_limit
        room = self.queue_max - queue_depth
        allowed = self.local_sources
        context = self.tx_context_id
        seq = self._seq
        frame, v4, v6 = _tun_frame, allowed._v4, allowed._v6
        for packet in packets:
            c.tun_rx_packets += 1
            c.tun_rx_bytes += len(packet)
            if frame is not None:  # checked and framed in C: the payload, or the index of the reason
                framed = frame(packet, limit, v4, v6, context, seq)
                reason = None if type(framed) is bytes else _TUN_REASONS[framed]
            else:
                framed = None
                reason = check_ip_untrusted(packet, mtu=limit, allowed_src=allowed, direction=Direction.FROM_TUN)
            if reason is DropReason.TUN_OVERSIZE and (pieces := fragment_v4(packet, limit, allowed)) is not None:
                if len(out) + len(pieces) > room:
                    drops[DropReason.QUEUE_FULL] += 1
                else:  # IPv4 without DF: fragments that fit, like a router
                    self.fragmented += 1
                    for piece in pieces:
                        out.append(encode_datagram(context, seq, piece))
                        seq = (seq + 1) & _SEQ_MASK
            elif reason is not None:
                drops[reason] += 1
                if reason is DropReason.TUN_OVERSIZE:
                    self._too_big(packet, limit)
            elif len(out) >= room:
                drops[DropReason.QUEUE_FULL] += 1
            else:
                out.append(framed if framed is not None else encode_datagram(context, seq, packet))
                seq = (seq + 1) & _SEQ_MASK
        self._seq = seq
        return out

    def _too_big(self, packet: bytes, limit: int) -> None:
        now = self._clock()
        self._icmp_tokens = min(ICMP_TOO_BIG_RATE, self._icmp_tokens + (now - self._icmp_at) * ICMP_TOO_BIG_RATE)
        self._icmp_at = now
        if self._icmp_tokens < 1.0:
            return
        error = too_big(packet, limit, self.local_sources, self.peer_v4, self.peer_v6)
        if error is not None:
            self._icmp_tokens -= 1.0
            self.icmp_too_big_sent += 1
            self.to_tun.append(error)

    def sent(self, payloads: list[bytes]) -> None:
        """Count payloads handed to the QUIC layer."""
        c = self.counters
        c.dgram_tx_packets += len(payloads)
        c.dgram_tx_bytes += sum(map(len, payloads))

    # ---- peer -> TUN ------------------------------------------------------

    def from_peer(self, payload: bytes | memoryview) -> memoryview | None:
        """Validate one DATAGRAM payload; return the IP packet to write, or None (counted)."""
        c = self.counters
        c.dgram_rx_packets += 1
        c.dgram_rx_bytes += len(payload)
        if not self.established:
            c.drops[DropReason.DGRAM_NOT_READY] += 1
            return None
        if _peer_packet is not None:  # the same checks in C: (packet, sequence), or the index of the reason
            sources = self.peer_sources
            checked = _peer_packet(payload, self.rx_context_id, self.rx_previous, self.mtu, sources._v4, sources._v6)
            if type(checked) is int:
                c.drops[_PEER_REASONS[checked]] += 1
                return None
            c.rx_sequence.observe(checked[1])
            return checked[0]
        try:
            context_id, sequence, _flags, _version, packet = parse_header_untrusted(payload)
        except BadPacket as exc:
            c.drops[exc.reason] += 1
            return None
        if context_id != self.rx_context_id and context_id != self.rx_previous:
            c.drops[DropReason.DGRAM_UNKNOWN_CONTEXT] += 1
            return None
        reason = check_ip_untrusted(packet, mtu=self.mtu, allowed_src=self.peer_sources, direction=Direction.FROM_PEER)
        if reason is not None:
            c.drops[reason] += 1
            return None
        c.rx_sequence.observe(sequence)
        return packet

    def written(self, packet: memoryview | bytes) -> None:
        c = self.counters
        c.tun_tx_packets += 1
        c.tun_tx_bytes += len(packet)
