"""QUIC engine adapter: the one place that names the QUIC library.

The rest of the worker gets everything engine-specific from `load_engine`:
the connection and configuration classes, the events module, and a handful
of small functions (`EngineClasses`) for what the two engines expose
differently. ``Tunnel`` never reads a private attribute of a connection.

* **aioquic** (default, pure Python): the functions read aioquic internals,
  pinned by pyproject's version range: ``_datagrams_pending`` (queue depth),
  ``_max_datagram_size`` and ``_peer_cid.cid`` (exact DATAGRAM budget),
  ``_remote_max_datagram_frame_size``, ``_loss._rtt_smoothed`` and
  ``tls._peer_certificate`` (pinning).
* **qh3** (optional extra ``fast``; same API, packet core in Rust). qh3 2.x
  differs in ways that matter here, each handled by `Qh3Connection`:

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
  - path MTU probing is off, so the packet size is the configured one.

`Engine.AUTO` picks qh3 when it imports, else aioquic. The two engines
interoperate (tests run every pairing).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from l3ptp.ipc.constants import MAX_CID_LEN, QUIC_DATAGRAM_OVERHEAD_MAX, QUIC_OVERHEAD_NO_CID
from l3ptp.ipc.control_messages import Engine

__all__ = ["EngineClasses", "EngineUnavailable", "available_engines", "load_engine", "warm_up"]



class EngineUnavailable(RuntimeError):
    """The requested QUIC engine is not installed or not supported."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineClasses:
    name: Engine
    QuicConnection: Any
    QuicConfiguration: Any
    events: ModuleType
    #: configure_tls(cfg, is_client, key, cert): TLS settings for our pinning
    #: (client: no CA check, Ed25519 offered; server: the node's cert + key).
    configure_tls: Callable[[Any, bool, Ed25519PrivateKey, x509.Certificate | None], None]
    #: Largest DATAGRAM payload the connection can send in one packet now.
    datagram_budget: Callable[[Any], int]
    #: DATAGRAMs queued and not yet sent.
    queue_depth: Callable[[Any], int]
    #: receive_many(conn, datagrams, addr, now): feed received UDP payloads in order.
    receive_many: Callable[[Any, list[bytes], Any, float], None]
    #: Smoothed RTT in seconds (0.0 before the first sample).
    smoothed_rtt: Callable[[Any], float]
    #: The peer's leaf certificate after the handshake, or None.
    peer_certificate: Callable[[Any], x509.Certificate | None]
    #: Start a QUIC key update (RFC 9001, 6); False, and nothing done, while
    #: the handshake is not confirmed (an endpoint must not update before).
    update_keys: Callable[[Any], bool]


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


def _budget(max_datagram_size: int, cid_len: int, remote_frame_max: int | None) -> int:
    budget = max_datagram_size - QUIC_OVERHEAD_NO_CID - cid_len
    if remote_frame_max is not None:
        budget = min(budget, remote_frame_max - 3)
    return max(0, budget)


# ---- aioquic ---------------------------------------------------------------


def _aioquic_configure_tls(cfg: Any, is_client: bool, key: Ed25519PrivateKey, cert: x509.Certificate | None) -> None:
    if is_client:
        # The listener's certificate is checked against the pin after the
        # handshake (aioquic still verifies CertificateVerify).
        cfg.verify_mode = ssl.CERT_NONE
    else:
        cfg.certificate = cert
        cfg.private_key = key


def _aioquic_budget(conn: Any) -> int:
    return _budget(conn._max_datagram_size, len(conn._peer_cid.cid), conn._remote_max_datagram_frame_size)


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
        """aioquic's connection with `RetainingCryptoPair` for 1-RTT."""

        def _initialize(self, peer_cid: bytes) -> None:
            super()._initialize(peer_cid)
            self._cryptos[tls.Epoch.ONE_RTT].__class__ = RetainingCryptoPair

    return AioquicConnection


def _aioquic_engine() -> EngineClasses:
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
    )


def _receive_each(conn: Any, datagrams: list[bytes], addr: Any, now: float) -> None:
    for data in datagrams:
        conn.receive_datagram(data, addr, now=now)


# ---- qh3 -------------------------------------------------------------------


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
                    feed = super().send_datagram_frame
                    while pending:
                        cost = len(pending[0]) + QUIC_DATAGRAM_OVERHEAD_MAX
                        if cost > room:
                            break
                        feed(pending.popleft())
                        room -= cost
                return super().datagrams_to_send(now)
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

        def _fail(self, exc: Any) -> None:
            # qh3 raises from the send path (e.g. a DATAGRAM that cannot fit);
            # end the connection like a protocol error instead.
            self._failed = True
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
            try:
                super().receive_many_datagrams(datagrams, addr, now)
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
    return _budget(core.active_path[5], MAX_CID_LEN, conn._remote_max_datagram_frame_size)


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


def _qh3_engine() -> EngineClasses:
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
    )


_CACHE: dict[Engine, EngineClasses] = {}


def load_engine(engine: Engine = Engine.AUTO) -> EngineClasses:
    """The classes of the requested engine (AUTO = qh3 if importable, else aioquic)."""
    if engine is Engine.AUTO:
        try:
            return load_engine(Engine.QH3)
        except EngineUnavailable:
            return load_engine(Engine.AIOQUIC)
    cached = _CACHE.get(engine)
    if cached is None:
        if engine is Engine.AIOQUIC:
            cached = _aioquic_engine()
        elif engine is Engine.QH3:
            cached = _qh3_engine()
        else:
            raise EngineUnavailable(f"unknown QUIC engine {engine!r}")
        _CACHE[engine] = cached
    return cached


def available_engines() -> list[Engine]:
    """Engines that load here, aioquic first."""
    out = []
    for engine in (Engine.AIOQUIC, Engine.QH3):
        try:
            load_engine(engine)
        except EngineUnavailable:
            continue
        out.append(engine)
    return out


#: Rounds of datagram exchange `warm_up` allows for one handshake (one to three are used).
_WARM_UP_ROUNDS = 8


def warm_up() -> list[Engine]:
    """One throwaway QUIC handshake, in memory, with each engine that loads; the engines that completed it.

    The first handshake of a process pays one-time costs (qh3: about 0.1-0.15 s in its first key
    exchange, at the connector's ClientHello and the listener's first candidate), which would fall in
    the recovery after a worker's kill -9. The controller's spare worker runs this while it waits for its
    configuration (worker/__main__.py), so a replacement starts with them paid. No socket, no I/O.
    """
    from l3ptp.ipc.constants import ALPN

    from . import keys
    from .admission import parse_initial

    key = keys.generate_private_key()
    cert = keys.self_signed_certificate(key)
    warmed = []
    for engine in available_engines():
        e = load_engine(engine)
        ccfg = e.QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        e.configure_tls(ccfg, True, key, None)
        ccfg.server_name = "warm-up"
        scfg = e.QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        e.configure_tls(scfg, False, key, cert)
        caddr, saddr = ("127.0.0.1", 2), ("127.0.0.1", 1)
        client = e.QuicConnection(configuration=ccfg)
        client.connect(saddr, now=0.0)
        server: Any = None
        done: set[str] = set()
        for rnd in range(_WARM_UP_ROUNDS):
            now = rnd * 0.001
            out = [d for d, _ in client.datagrams_to_send(now=now)]
            if out and server is None:
                initial = parse_initial(out[0])
                if initial is None:
                    break
                server = e.QuicConnection(configuration=scfg, original_destination_connection_id=initial.dcid)
            if out:
                e.receive_many(server, out, caddr, now)
            if server is not None:
                back = [d for d, _ in server.datagrams_to_send(now=now)]
                if back:
                    e.receive_many(client, back, saddr, now)
            for name, conn in (("client", client), ("server", server)):
                while conn is not None and (event := conn.next_event()) is not None:
                    if isinstance(event, e.events.HandshakeCompleted):
                        done.add(name)
            if done == {"client", "server"}:
                warmed.append(engine)
                break
    return warmed
