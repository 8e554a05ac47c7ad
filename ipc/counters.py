"""Data-path counters: traffic totals, drop reasons and sequence-gap loss.

Conventions:

* Every packet the worker does not forward is counted under exactly one
  `DropReason`. Reasons are named ``<where>_<why>``: ``tun_*`` reasons are
  packets read from the TUN device on their way to the peer, ``dgram_*`` are
  DATAGRAMs received from the peer on their way to the TUN device,
  ``initial_*`` are new QUIC connection attempts a listener refused, and the
  few others name the stage itself (``queue_full``). The enum value is the
  lower-case name and is used verbatim as the exported metric label, so
  renaming a member is a metrics-contract change.
* `Counters` is the only place counters live. It is a plain object with
  `__slots__` and integer attributes, updated in place on the hot path
  (``c.tun_rx_packets += 1``); no per-packet allocation.
* `SequenceTracker` estimates peer-to-us loss from the L3PTP header's
  ``packet_sequence`` (metrics only; nothing is retransmitted).

Pure: stdlib only, no I/O, no clock.
"""

from __future__ import annotations

import enum

__all__ = ["TRAFFIC_FIELDS", "Counters", "DropReason", "SequenceTracker"]

_SEQ_MOD = 1 << 32
_SEQ_HALF = 1 << 31


class DropReason(enum.StrEnum):
    """Why a packet was dropped. Value == lower-case name == metric label."""

    # TUN -> peer
    #: Malformed IP packet read from TUN (too short, bad lengths).
    TUN_BAD_PACKET = enum.auto()
    #: IP version nibble is neither 4 nor 6.
    TUN_BAD_IP_VERSION = enum.auto()
    #: A TUN with offloads (IFF_VNET_HDR): a read whose virtio_net_hdr or super-packet cannot be turned into IP
    #: packets (worker/vnet.py); counted once per read, as one packet.
    TUN_BAD_VNET = enum.auto()
    #: Source address outside our local allowed prefixes.
    TUN_SRC_NOT_ALLOWED = enum.auto()
    #: Larger than the tunnel MTU or the negotiated DATAGRAM budget.
    TUN_OVERSIZE = enum.auto()
    #: No established session to send on.
    TUN_NOT_READY = enum.auto()
    #: The bounded queue toward QUIC was full.
    QUEUE_FULL = enum.auto()
    #: The QUIC layer refused or failed to send the DATAGRAM: the kernel refused UDP
    #: datagrams of the transmit that followed a TUN batch (one per refused UDP
    #: datagram, at most the batch's DATAGRAMs; an estimate: a UDP datagram may carry
    #: several DATAGRAMs, or none).
    DGRAM_SEND_ERROR = enum.auto()
    #: DATAGRAMs still queued in QUIC when their connection ended (closed, failed, replaced by a
    #: reconnect): they never left.
    DGRAM_LOST_ON_CLOSE = enum.auto()

    # peer -> TUN
    #: Malformed L3PTP header (short, wrong type/version, bad lengths).
    DGRAM_BAD_HEADER = enum.auto()
    #: Header ip_version not 4/6, not matching the packet, or empty packet.
    DGRAM_BAD_IP_VERSION = enum.auto()
    #: Malformed inner IP packet.
    DGRAM_BAD_IP = enum.auto()
    #: datagram_context_id does not belong to this session.
    DGRAM_UNKNOWN_CONTEXT = enum.auto()
    #: Inner source address outside the peer's allowed prefixes.
    DGRAM_SRC_NOT_ALLOWED = enum.auto()
    #: Inner packet larger than the tunnel MTU.
    DGRAM_OVERSIZE = enum.auto()
    #: DATAGRAM arrived before the session was established.
    DGRAM_NOT_READY = enum.auto()
    #: TUN write would block (EAGAIN/ENOBUFS).
    TUN_WRITE_EAGAIN = enum.auto()
    #: Any other TUN write failure.
    TUN_WRITE_ERROR = enum.auto()

    # new QUIC connections (listener; worker/admission.py)
    #: An Initial-looking datagram that is no QUIC v1 Initial.
    INITIAL_MALFORMED = enum.auto()
    #: Answered with a stateless Retry instead of a connection (under load).
    INITIAL_RETRY = enum.auto()
    #: A Retry token that is forged, expired or made for another address.
    INITIAL_BAD_TOKEN = enum.auto()
    #: The budget for new connection attempts (per source, in total) and for
    #: Retry answers is spent.
    INITIAL_OVER_BUDGET = enum.auto()
    #: For a candidate connection before its handshake completed: an Initial
    #: of no handshake in progress there (another destination CID), or more
    #: datagrams than a handshake needs (CANDIDATE_DATAGRAMS_MAX).
    INITIAL_TO_CANDIDATE = enum.auto()

    # one UDP port per network (worker/steering.py)
    #: A UDP datagram whose destination CID names another queue of the network's shared port: it reached this
    #: worker while steering was not in place (a worker restarting, a restarted helper's program not yet
    #: attached). Never fed to QUIC nor to admission.
    DGRAM_WRONG_QUEUE = enum.auto()


#: Names of the traffic counters, in `Counters.snapshot()` order.
TRAFFIC_FIELDS: tuple[str, ...] = (
    "tun_rx_packets",
    "tun_rx_bytes",
    "tun_tx_packets",
    "tun_tx_bytes",
    "dgram_rx_packets",
    "dgram_rx_bytes",
    "dgram_tx_packets",
    "dgram_tx_bytes",
    # DATAGRAMs from connections that have not completed AUTH: never part of
    # a session's totals (nor of its key-update budget), all dropped.
    "unauth_rx_packets",
    "unauth_rx_bytes",
)


class SequenceTracker:
    """Estimate lost packets from u32 ``packet_sequence`` values.

    O(1) time and memory per packet. Sequences wrap at 2**32 and are
    unwrapped into an unbounded integer line relative to the first one seen.
    The tracker keeps the lowest and highest unwrapped sequence seen and the
    number of packets observed::

        expected = highest - lowest + 1
        lost     = max(0, expected - received)

    A value within 2**31 ahead of the highest (modulo 2**32) moves the
    highest forward; any other value is taken as a late (reordered) or
    duplicate packet and only extends the lowest if it lies before it.

    Limits (this is a metric, not an accounting):

    * Duplicates count as received, so each duplicate hides one loss; the
      estimate is then a lower bound.
    * A late packet counts as lost until it arrives, then the estimate drops
      back; ``lost`` can therefore go down as well as up.
    * Losses before the first and after the last packet seen are invisible.
    * A jump of 2**31 or more in either direction (a peer restart without
      `reset()`, or more than 2**31 packets lost in a row) is misread as
      reordering or as a huge loss. Call `reset()` whenever a new session
      (and so a new sequence space) begins.
    * The peer is authenticated, but a misbehaving one can still make the
      figure arbitrarily large; do not use it for decisions.
    """

    __slots__ = ("_highest", "_highest_raw", "_lowest", "received")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next sequence starts a new span."""
        self.received = 0
        self._highest = 0
        self._lowest = 0
        self._highest_raw = -1  # no packet seen yet

    def observe(self, sequence: int) -> None:
        """Record one received packet's sequence number (0 <= sequence < 2**32)."""
        sequence &= 0xFFFFFFFF
        self.received += 1
        if self._highest_raw < 0:
            self._highest_raw = sequence
            return
        delta = (sequence - self._highest_raw) % _SEQ_MOD
        if delta < _SEQ_HALF:
            if delta:
                self._highest += delta
                self._highest_raw = sequence
        else:
            position = self._highest - (_SEQ_MOD - delta)
            if position < self._lowest:
                self._lowest = position

    @property
    def expected(self) -> int:
        """Packets the sender emitted within the span seen so far."""
        if self._highest_raw < 0:
            return 0
        return self._highest - self._lowest + 1

    @property
    def lost(self) -> int:
        """Estimated lost packets (see the class docstring for the limits)."""
        return max(0, self.expected - self.received)

    def __repr__(self) -> str:
        return f"SequenceTracker(received={self.received}, expected={self.expected}, lost={self.lost})"


class Counters:
    """Every counter of one worker queue.

    Traffic counters are plain ints named ``<where>_<rx|tx>_<packets|bytes>``
    (``tun_rx`` = read from TUN, ``dgram_tx`` = DATAGRAMs sent, ``unauth_rx`` =
    DATAGRAMs received on a connection that has not authenticated), bumped in
    place by the data path. ``drops`` maps every `DropReason` to a count and
    always holds every reason. ``rx_sequence`` tracks the peer's
    ``packet_sequence`` values for the `seq_lost` estimate.
    ``peer_route_limit`` counts sessions closed with LIMIT because the peer's
    ROUTE_UPDATEs added up to more routes than one READY can carry.
    """

    __slots__ = (*TRAFFIC_FIELDS, "drops", "rx_sequence", "peer_route_limit")

    def __init__(self) -> None:
        self.tun_rx_packets = 0
        self.tun_rx_bytes = 0
        self.tun_tx_packets = 0
        self.tun_tx_bytes = 0
        self.dgram_rx_packets = 0
        self.dgram_rx_bytes = 0
        self.dgram_tx_packets = 0
        self.dgram_tx_bytes = 0
        self.unauth_rx_packets = 0
        self.unauth_rx_bytes = 0
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.rx_sequence = SequenceTracker()
        self.peer_route_limit = 0

    def drop(self, reason: DropReason, n: int = 1) -> None:
        """Count `n` packets dropped for `reason`."""
        self.drops[reason] += n

    def total_drops(self) -> int:
        """Sum of all drop counters."""
        return sum(self.drops.values())

    @property
    def seq_lost(self) -> int:
        """Estimated peer-to-us loss from sequence gaps (see `SequenceTracker`)."""
        return self.rx_sequence.lost

    def snapshot(self) -> dict[str, int]:
        """Traffic counters by attribute name (exactly `TRAFFIC_FIELDS`)."""
        return {name: getattr(self, name) for name in TRAFFIC_FIELDS}

    def drops_snapshot(self) -> dict[str, int]:
        """Every drop reason (its string value) to its count, zeros included."""
        return {reason.value: count for reason, count in self.drops.items()}

    def __repr__(self) -> str:
        traffic = ", ".join(f"{k}={v}" for k, v in self.snapshot().items())
        return f"Counters({traffic}, drops={self.total_drops()}, seq_lost={self.seq_lost})"
