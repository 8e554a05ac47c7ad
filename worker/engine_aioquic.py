"""The aioquic engine (the default, pure Python): `aioquic_engine` for `engine.load_engine`.

The functions read aioquic internals, pinned by pyproject's version range:
``_datagrams_pending`` (queue depth), ``_max_datagram_size`` and
``_peer_cid.cid`` (exact DATAGRAM budget), ``_remote_max_datagram_frame_size``,
``_loss._rtt_smoothed`` and ``tls._peer_certificate`` (pinning). aioquic
itself is imported only when the engine is loaded.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from l3ptp.ipc.control_messages import Engine

from .engine import EngineClasses, payload_budget

__all__ = ["aioquic_engine"]


def _aioquic_update_keys(conn: Any) -> bool:
    # RFC 9001, 6.1: no new update before a packet sent with the current keys
    # is acknowledged. aioquic does not check this, and two quick updates
    # would leave a peer one key phase behind, unable to decrypt anything: we
    # remember the first packet number of each update and wait for its ACK.
    from aioquic import tls

    if not conn._handshake_confirmed:
        return False
    first = getattr(conn, "_l3ptp_key_update_pn", None)
    if first is not None and conn._spaces[tls.Epoch.ONE_RTT].largest_acked_packet < first:
        return False
    conn.request_key_update()
    conn._l3ptp_key_update_pn = conn._packet_number  # the next packet is the first with the new keys
    return True


def _aioquic_configure_tls(cfg: Any, is_client: bool, key: Ed25519PrivateKey, cert: x509.Certificate | None) -> None:
    if is_client:
        # The listener's certificate is checked against the pin after the
        # handshake (aioquic still verifies CertificateVerify).
        cfg.verify_mode = ssl.CERT_NONE
    else:
        cfg.certificate = cert
        cfg.private_key = key


def _aioquic_budget(conn: Any) -> int:
    return payload_budget(conn._max_datagram_size, len(conn._peer_cid.cid), conn._remote_max_datagram_frame_size)


def _make_aioquic_connection() -> type:
    from aioquic import tls
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.crypto import CryptoError, CryptoPair
    from aioquic.quic.packet import decode_packet_number, is_long_header

    class RetainingCryptoPair(CryptoPair):  # type: ignore[misc,valid-type]
        """aioquic's 1-RTT keys, plus the previous receive keys after a key update.

        RFC 9001, 6.5: packets the peer sent just before it saw our update
        arrive under the old keys; aioquic throws those keys away at once, so
        every update would lose about an RTT of the peer's packets. Old keys
        open only packets numbered below the first one opened with the new
        keys, and are replaced at the next update.
        """

        _prev_aead: Any = None
        _prev_phase = -1
        _first_new_pn: int | None = None

        def _update_key(self, trigger: str) -> None:
            aead, phase = self.recv.aead, self.recv.key_phase
            super()._update_key(trigger)
            self._prev_aead, self._prev_phase, self._first_new_pn = aead, phase, None

        def decrypt_packet(self, packet: bytes, encrypted_offset: int,
                           expected_packet_number: int) -> tuple[bytes, bytes, int]:
            try:
                plain_header, payload, pn = super().decrypt_packet(packet, encrypted_offset, expected_packet_number)
            except CryptoError:
                if self._prev_aead is None:
                    raise
                plain_header, truncated = self.recv.hp.remove(packet, encrypted_offset)
                first = plain_header[0]
                pn = decode_packet_number(truncated, ((first & 0x03) + 1) * 8, expected_packet_number)
                if (is_long_header(first) or (first & 0x04) >> 2 != self._prev_phase
                        or (self._first_new_pn is not None and pn >= self._first_new_pn)):
                    raise
                return plain_header, self._prev_aead.decrypt(packet[len(plain_header):], plain_header, pn), pn
            if self._prev_aead is not None and (self._first_new_pn is None or pn < self._first_new_pn):
                self._first_new_pn = pn
            return plain_header, payload, pn

    class AioquicConnection(QuicConnection):  # type: ignore[misc,valid-type]
        """aioquic's connection with `RetainingCryptoPair` for 1-RTT and `BurstPacer`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._loss._pacer = burst_pacer_class()(max_datagram_size=self._max_datagram_size)

        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self._cryptos[tls.Epoch.ONE_RTT].__class__ = RetainingCryptoPair

    return AioquicConnection


#: `BurstPacer`'s burst: 2 ms of the pacing rate, at least 10 and at most 32 packets (41 KB at 1280
#: bytes, inside a default 208 KiB socket buffer even at the kernel's per-packet overhead). In
#: lab/bench/worker.py, 32 lost nothing where 64 lost 0.1-0.25 % and gained no speed.
BURST_INTERVAL, BURST_MIN_PACKETS, BURST_MAX_PACKETS = 0.002, 10, 32
_BURST_PACER: list[type] = []


def burst_pacer_class() -> type:
    """aioquic's pacer with quinn's timing: once the bucket is empty, wait until it is full again.

    aioquic's `QuicPacketPacer` asks for a wake-up one packet time (a few microseconds at LAN
    rates) after its bucket (at most 16 packets) runs dry, so a saturated sender wakes its timer
    for every packet or few (lab/bench/worker.py --pacers counted 53-80 timer wake-ups per
    1,000 packets, up to 289 in an open-loop run). This pacer keeps aioquic's rate (congestion
    window per smoothed RTT) and its bucket arithmetic, but the bucket holds `BURST_INTERVAL` of
    that rate (within the packet bounds) and an empty bucket waits until it is full: one wake-up
    per burst, 3 per 1,000 packets. On a long path the 10-packet floor keeps bursts smaller than
    aioquic's own 16. The timing follows quinn-proto's src/connection/pacing.rs (2 ms interval;
    its cap is 256 packets, ours 32).
    """
    if _BURST_PACER:
        return _BURST_PACER[0]
    from aioquic.quic.recovery import QuicPacketPacer

    class BurstPacer(QuicPacketPacer):  # type: ignore[misc,valid-type]
        interval, min_burst, max_burst = BURST_INTERVAL, BURST_MIN_PACKETS, BURST_MAX_PACKETS

        def next_send_time(self, now: float) -> float | None:
            if self.packet_time is not None:
                self.update_bucket(now=now)
                if self.bucket_time <= 0:
                    return now + max(self.packet_time, self.bucket_max)
            return None

        def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
            super().update_rate(congestion_window, smoothed_rtt)
            pt = self.packet_time
            self.bucket_max = min(max(self.interval, self.min_burst * pt), self.max_burst * pt)

    _BURST_PACER.append(BurstPacer)
    return BurstPacer


def _aioquic_pin_cids(base: type, new_cid: Callable[[int], bytes]) -> type:
    """aioquic draws its CIDs from os.urandom in `__init__` (the first host CID; a client's first DCID) and in
    `_replenish_connection_ids` (NEW_CONNECTION_ID): both replaced before any is sent or used for keys (a
    client's Initial keys are derived from the DCID in `connect`)."""

    class PinnedCids(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            first = self._host_cids[0]
            first.cid = self.host_cid = self._local_initial_source_connection_id = new_cid(len(first.cid))
            if self._is_client:
                self._peer_cid.cid = self._original_destination_connection_id = new_cid(len(self._peer_cid.cid))

        def _replenish_connection_ids(self) -> None:
            known = len(self._host_cids)
            super()._replenish_connection_ids()
            for issued in self._host_cids[known:]:
                issued.cid = new_cid(len(issued.cid))

    return PinnedCids


def aioquic_engine() -> EngineClasses:
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration

    return EngineClasses(
        name=Engine.AIOQUIC,
        QuicConnection=_make_aioquic_connection(),
        QuicConfiguration=QuicConfiguration,
        events=events,
        configure_tls=_aioquic_configure_tls,
        datagram_budget=_aioquic_budget,
        queue_depth=lambda conn: len(conn._datagrams_pending),
        receive_many=_receive_each,
        smoothed_rtt=lambda conn: float(conn._loss._rtt_smoothed or 0.0),
        peer_certificate=lambda conn: getattr(conn.tls, "_peer_certificate", None),
        update_keys=_aioquic_update_keys,
        pin_cids=_aioquic_pin_cids,
    )


def _receive_each(conn: Any, datagrams: list[bytes], addr: Any, now: float) -> None:
    for data in datagrams:
        conn.receive_datagram(data, addr, now=now)
