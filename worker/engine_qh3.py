"""The qh3 engine (optional extra ``fast``; aioquic's API, packet core in Rust): `qh3_engine`.

qh3 2.x differs from aioquic in ways that matter here, each handled by
`Qh3Connection`:

- its core does **not** congestion-control DATAGRAM frames (a sender
  offered 3000 datagrams with no ACK emits all 3000; aioquic emits about a
  congestion window). `Qh3Connection` keeps DATAGRAMs in its own queue and
  hands the core only what fits ``congestion_window - bytes_in_flight``;
- its wrapper splits a received datagram into QUIC packets and drops
  trailing zero padding, which aioquic puts after a client Initial; the
  server then has a too-small anti-amplification credit and fails the
  handshake ("packet builder capacity exhausted"). `Qh3Connection`
  passes such padding to the core together with the packet;
- a DATAGRAM larger than the packet makes ``datagrams_to_send`` raise
  (aioquic stalls); the datapath never queues one, and the adapter turns a
  raise into a closed connection instead of an exception in the loop;
- certificates and keys are qh3's own types (converted from
  ``cryptography``), and the client must opt in to Ed25519 signatures;
- the peer CID is not exposed, so the budget assumes the longest CID (20
  bytes), the same worst case config validation uses;
- path MTU probing is off, so the packet size is the configured one;
- its wrappers around the core do per-packet work for qlog even with no logger (every sent packet's
  header parsed and the packet copied; a call per received datagram): without a logger (the worker never
  sets one) `Qh3Connection` sends and receives batches through the core's own calls, mapping the core's
  RuntimeError to a closed connection as qh3's `_call_core` does;
- its Rust core draws NEW_CONNECTION_ID CIDs itself, out of our reach: a connection pinned to a queue
  (`_qh3_pin_cids`, one UDP port per network) tells its core the peer allows 2 active CIDs (the least
  RFC 9000 allows; qh3 refuses 1), so it issues ONE spare CID that is not pinned. l3ptp's connectors
  (both engines) never switch to a spare CID (they keep the handshake's: no active migration), so every
  packet carries the pinned one; a peer that did switch would have its packets dropped on another queue
  (`dgram_wrong_queue`) and the session would end by dead-peer detection.

qh3 itself is imported only when the engine is loaded; `qh3_engine` raises
`EngineUnavailable` when it is not installed.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from l3ptp.ipc.constants import MAX_CID_LEN, QUIC_DATAGRAM_OVERHEAD_MAX
from l3ptp.ipc.control_messages import Engine

from .engine import EngineClasses, EngineUnavailable, payload_budget

__all__ = ["qh3_engine"]


def _qh3_update_keys(conn: Any) -> bool:
    if not conn._handshake_confirmed:
        return False
    try:
        conn.request_key_update()
    except ValueError:
        # "invalid key phase": qh3 enforces RFC 9001, 6.1 itself (the last
        # update is not acknowledged yet).
        return False
    return True



def _padded_packet_end(data: bytes, pull_header: Any, cid_len: int) -> int | None:
    """End of the QUIC packets in `data` if only zero padding follows, else None."""
    offset = 0
    n = len(data)
    while offset < n:
        try:
            end = pull_header(data, offset, cid_len)[9]
        except ValueError:
            break
        if end <= offset:
            return None
        offset = end
    if 0 < offset < n and not any(data[offset:]):
        return offset
    return None


def _make_qh3_connection() -> type:
    from qh3._hazmat import pull_quic_header as pull_header
    from qh3.quic import events
    from qh3.quic.connection import QuicConnection, QuicConnectionError, QuicConnectionState
    from qh3.quic.packet import QuicErrorCode, QuicPacketType

    class Qh3Connection(QuicConnection):  # type: ignore[misc,valid-type]
        """qh3's connection with congestion-controlled DATAGRAMs (see module doc)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._datagrams_pending: deque[bytes] = deque()
            self._failed = False

        def send_datagram_frame(self, data: bytes) -> None:
            self._datagrams_pending.append(data)

        def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
            if self._failed:
                return []
            pending = self._datagrams_pending
            core = self._core
            try:
                if pending and core is not None and self._handshake_complete and self._close_event is None:
                    room = core.congestion_window - core.bytes_in_flight
                    feed = core.send_datagram  # qh3's send_datagram_frame: this call, through _call_core
                    while pending:
                        cost = len(pending[0]) + QUIC_DATAGRAM_OVERHEAD_MAX
                        if cost > room:
                            break
                        feed(pending.popleft())
                        room -= cost
                if core is None or self._quic_logger is not None:
                    return super().datagrams_to_send(now)
                # qh3's loop without its qlog: it parses every packet's header and copies the packet
                # (`_log_packets`) even with no logger to give them to.
                out = []
                poll = core.poll_transmit
                while (transmit := poll(now)) is not None:
                    out.append((transmit[0], transmit[1]))
                return out
            except RuntimeError as exc:
                self._core_failed(exc)
                return []
            except QuicConnectionError as exc:
                self._fail(exc)
                return []

        def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
            # aioquic queues stream data on a closing or draining connection and
            # never sends it; qh3's core raises. The peer's CLOSE message and its
            # CONNECTION_CLOSE can arrive in one batch, so our reply to the first
            # meets the second: drop it like aioquic does.
            if self._failed or self._close_event is not None:
                return
            core = self._core
            if core is not None and core.state in ("closing", "draining", "terminated"):
                return
            try:
                super().send_stream_data(stream_id, data, end_stream)
            except QuicConnectionError as exc:
                self._fail(exc)

        def request_key_update(self) -> None:
            if self._failed or self._close_event is not None:
                return
            try:
                super().request_key_update()
            except QuicConnectionError as exc:
                self._fail(exc)

        def _core_failed(self, exc: RuntimeError) -> None:
            # The core raised on a call made without qh3's `_call_core`: its mapping, then `_fail`.
            self._fail(QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)))

        def _fail(self, exc: Any) -> None:
            # qh3 raises from the send path (e.g. a DATAGRAM that cannot fit);
            # end the connection like a protocol error instead.
            self._failed = True
            self.datagrams_lost = getattr(self, "datagrams_lost", 0) + len(self._datagrams_pending)
            self._datagrams_pending.clear()
            if self._close_event is None:
                self._close_event = events.ConnectionTerminated(
                    QuicErrorCode.INTERNAL_ERROR, None, f"qh3: {exc.reason_phrase}"
                )
            if self._state is not QuicConnectionState.TERMINATED:
                self._state = QuicConnectionState.TERMINATED
                self._events.append(self._close_event)

        def get_timer(self) -> float | None:
            return None if self._failed else super().get_timer()

        def handle_timer(self, now: float) -> None:
            if not self._failed:
                super().handle_timer(now)

        def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
            if self._failed:
                return
            cid_len = self._configuration.connection_id_length
            end = _padded_packet_end(data, pull_header, cid_len) if data and data[0] & 0x80 else None
            try:
                if end is None:
                    super().receive_datagram(data, addr, now)
                else:
                    self._receive_padded(data, addr, now, end, cid_len)
            except QuicConnectionError as exc:
                self._fail(exc)

        def receive_many_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
            if self._failed:
                return
            if not self._handshake_complete:  # padded Initials are handled one by one
                for data in datagrams:
                    self.receive_datagram(data, addr, now)
                return
            core = self._core
            try:
                if core is None or self._quic_logger is not None:
                    super().receive_many_datagrams(datagrams, addr, now)
                    return
                # qh3's, without its per-datagram qlog call and the address check (ours come from recvmsg)
                core.receive_many_datagrams(datagrams, addr, now)
                self._drain_core()
            except RuntimeError as exc:
                self._core_failed(exc)
            except QuicConnectionError as exc:
                self._fail(exc)

        def _receive_padded(self, data: bytes, addr: Any, now: float, end: int, cid_len: int) -> None:
            # qh3 2.x's receive_datagram, except that the zero padding after
            # the last packet goes to the core with that packet, so that it
            # counts toward the anti-amplification credit (RFC 9000, 8.1).
            address = self._normalize_address(addr)
            self._log_datagram("datagrams_received", data)
            if self._core is None:
                if self._is_client or len(data) < 1200:
                    return
                header = pull_header(data, 0, cid_len)
                if header[1] != int(QuicPacketType.INITIAL):
                    return
                version, destination_cid = header[0], header[3]
                if version not in self._configuration.supported_versions:
                    return
                self._remote_addr = address
                self._version = version
                self._create_core(address, destination_cid, now)
                self._create_tls(remote_source_cid=None)
            else:
                if self._receive_version_negotiation(data, address, now):
                    return
                if self._receive_retry(data, address, now):
                    return
            offset = 0
            while offset < end:
                packet_end = pull_header(data, offset, cid_len)[9]
                chunk_end = len(data) if packet_end >= end else packet_end
                report = self._call_core(self._core.receive_datagram, data[offset:chunk_end], address, now, len(data))
                if report[2]:
                    self._learn_remote_source_cid(data[offset:packet_end])
                self._drain_core()
                offset = packet_end

    return Qh3Connection


def _qh3_configure_tls(cfg: Any, is_client: bool, key: Ed25519PrivateKey, cert: x509.Certificate | None) -> None:
    from qh3._hazmat import Certificate, Ed25519PrivateKey as Qh3Ed25519
    from qh3.tls import SignatureAlgorithm

    cfg.probe_datagram_size = False
    if is_client:
        # qh3 verifies CertificateVerify with CERT_NONE too; it leaves
        # Ed25519 out of its default list, and our listener signs with it.
        cfg.verify_mode = ssl.CERT_NONE
        cfg.signature_algorithms = [SignatureAlgorithm.ED25519]
    else:
        assert cert is not None
        cfg.certificate = Certificate(cert.public_bytes(serialization.Encoding.DER))
        cfg.private_key = Qh3Ed25519(
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


def _qh3_budget(conn: Any) -> int:
    core = conn._core
    if core is None:
        return 0
    return payload_budget(core.active_path[5], MAX_CID_LEN, conn._remote_max_datagram_frame_size)


def _qh3_rtt(conn: Any) -> float:
    core = conn._core
    return float((core.smoothed_rtt if core is not None else None) or 0.0)


def _qh3_peer_certificate(conn: Any) -> x509.Certificate | None:
    cert = conn.get_peercert()
    if cert is None:
        return None
    try:
        return x509.load_der_x509_certificate(cert.public_bytes())
    except ValueError:
        return None


#: Position of active_connection_id_limit among the arguments qh3's `_call_core` passes to
#: `apply_peer_transport_parameters` (qh3 2.x, _hazmat.pyi; checked by tests/unit/test_worker_steering.py).
_CID_LIMIT_ARG = 11


def _qh3_pin_cids(base: type, new_cid: Callable[[int], bytes]) -> type:
    """qh3 picks the first host CID and a client's first DCID in Python (`__init__`; the core is created later,
    from them); replaced there. NEW_CONNECTION_ID CIDs come from the Rust core: it is told the peer's limit is 2,
    so it issues one, unpinned (see the module doc)."""

    class PinnedCids(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.host_cid = new_cid(len(self.host_cid))
            if self._is_client:
                self._original_destination_connection_id = new_cid(len(self._original_destination_connection_id))

        def _call_core(self, operation: Any, *args: Any) -> Any:
            if getattr(operation, "__name__", "") == "apply_peer_transport_parameters":
                args = (*args[:_CID_LIMIT_ARG], 2, *args[_CID_LIMIT_ARG + 1:])
            return super()._call_core(operation, *args)

    return PinnedCids


def qh3_engine() -> EngineClasses:
    try:
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
    except ImportError as exc:
        raise EngineUnavailable(f"QUIC engine 'qh3' is not installed: {exc}") from exc
    return EngineClasses(
        name=Engine.QH3,
        QuicConnection=_make_qh3_connection(),
        QuicConfiguration=QuicConfiguration,
        events=events,
        configure_tls=_qh3_configure_tls,
        datagram_budget=_qh3_budget,
        queue_depth=lambda conn: len(conn._datagrams_pending),
        receive_many=lambda conn, datagrams, addr, now: conn.receive_many_datagrams(datagrams, addr, now),
        smoothed_rtt=_qh3_rtt,
        peer_certificate=_qh3_peer_certificate,
        update_keys=_qh3_update_keys,
        pin_cids=_qh3_pin_cids,
    )
