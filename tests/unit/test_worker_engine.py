"""The QUIC engine adapter, in memory (no sockets): both engines, every pairing.

A `Link` moves datagrams between two sans-I/O connections on a virtual
clock, so the tests can drop packets or withhold ACKs deterministically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import pytest

from l3ptp.ipc.constants import ALPN, MAX_DATAGRAM_FRAME_SIZE, QUIC_DATAGRAM_OVERHEAD_MAX
from l3ptp.ipc.control_messages import Engine
from l3ptp.worker import keys
from l3ptp.worker.admission import parse_initial
from l3ptp.worker.engine import EngineClasses, EngineUnavailable, load_engine


def initial_dcid(data: bytes) -> bytes | None:
    initial = parse_initial(data)
    return initial.dcid if initial is not None else None
from tests.support.worker_fixtures import ENGINE_PAIRS, ENGINES

CLIENT_ADDR = ("127.0.0.1", 40000)
SERVER_ADDR = ("127.0.0.2", 4433)
HAS_QH3 = importlib.util.find_spec("qh3") is not None


def test_aioquic_engine_is_aioquic() -> None:
    from aioquic.quic.connection import QuicConnection

    engine = load_engine(Engine.AIOQUIC)
    assert engine.name is Engine.AIOQUIC
    assert issubclass(engine.QuicConnection, QuicConnection)  # only the 1-RTT crypto pair differs


def test_auto_prefers_qh3_when_importable() -> None:
    assert load_engine(Engine.AUTO).name is (Engine.QH3 if HAS_QH3 else Engine.AIOQUIC)
    assert load_engine().name is load_engine(Engine.AUTO).name


@pytest.mark.skipif(not HAS_QH3, reason="qh3 not installed")
def test_qh3_engine_wraps_qh3() -> None:
    from qh3.quic.connection import QuicConnection

    engine = load_engine(Engine.QH3)
    assert engine.name is Engine.QH3
    assert issubclass(engine.QuicConnection, QuicConnection)


def test_missing_qh3_is_unavailable_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from l3ptp.worker import engine as engine_mod

    real_import = builtins.__import__

    def no_qh3(name: str, *args: Any, **kw: Any) -> Any:
        if name == "qh3" or name.startswith("qh3."):
            raise ImportError("no qh3 here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(engine_mod, "_CACHE", {})
    monkeypatch.setattr(builtins, "__import__", no_qh3)
    with pytest.raises(EngineUnavailable):
        load_engine(Engine.QH3)
    assert load_engine(Engine.AUTO).name is Engine.AIOQUIC


def test_initial_dcid_only_for_initials() -> None:
    engine = load_engine(Engine.AIOQUIC)
    conn = engine.QuicConnection(configuration=_config(engine, True))
    conn.connect(SERVER_ADDR, now=0.0)
    first = conn.datagrams_to_send(now=0.0)[0][0]
    assert initial_dcid(first) == conn.original_destination_connection_id
    assert initial_dcid(b"\x40" + bytes(40)) is None  # short header
    assert initial_dcid(b"") is None


# ---- in-memory connections ---------------------------------------------------

_KEY = keys.generate_private_key()
_CERT = keys.self_signed_certificate(_KEY)


def _config(engine: EngineClasses, is_client: bool, max_datagram_size: int = 1350) -> Any:
    cfg = engine.QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=max_datagram_size,
        idle_timeout=60.0,
    )
    engine.configure_tls(cfg, is_client, _KEY, None if is_client else _CERT)
    if is_client:
        cfg.server_name = "l3ptp"
    return cfg


@dataclasses.dataclass
class Link:
    """A client and a server connection joined by a lossless, instant wire."""

    cengine: EngineClasses
    sengine: EngineClasses
    client: Any = None
    server: Any = None
    now: float = 0.0
    cevents: list[Any] = dataclasses.field(default_factory=list)
    sevents: list[Any] = dataclasses.field(default_factory=list)

    def start(self, max_datagram_size: int = 1350) -> None:
        self.client = self.cengine.QuicConnection(configuration=_config(self.cengine, True, max_datagram_size))
        self.client.connect(SERVER_ADDR, now=self.now)
        self._mds = max_datagram_size

    def to_server(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, _ in datagrams:
            if self.server is None:
                dcid = initial_dcid(data)
                assert dcid is not None
                self.server = self.sengine.QuicConnection(
                    configuration=_config(self.sengine, False, self._mds),
                    original_destination_connection_id=dcid,
                )
            self.server.receive_datagram(data, CLIENT_ADDR, now=self.now)
        self._drain()

    def to_client(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, _ in datagrams:
            self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
        self._drain()

    def _drain(self) -> None:
        for conn, out in ((self.client, self.cevents), (self.server, self.sevents)):
            while conn is not None and (event := conn.next_event()) is not None:
                out.append(event)

    def step(self, dt: float = 0.005) -> None:
        self.now += dt
        self.to_server(self.client.datagrams_to_send(now=self.now))
        if self.server is not None:
            self.to_client(self.server.datagrams_to_send(now=self.now))

    def handshake(self, max_datagram_size: int = 1350) -> None:
        self.start(max_datagram_size)
        for _ in range(20):
            self.step()
        for _ in range(5):  # let HANDSHAKE_DONE / ACKs settle
            self.step()

    def received(self, events: list[Any], engine: EngineClasses) -> list[bytes]:
        return [e.data for e in events if isinstance(e, engine.events.DatagramFrameReceived)]

    def fire_due_timers(self, *conns: Any) -> None:
        for conn in conns:
            timer = conn.get_timer()
            if timer is not None and timer <= self.now:
                conn.handle_timer(now=self.now)


def _names(events: list[Any]) -> set[str]:
    return {type(e).__name__ for e in events}


@pytest.mark.parametrize(("sname", "cname"), ENGINE_PAIRS)
def test_every_pairing_handshakes_pins_and_carries_datagrams(sname: Engine, cname: Engine) -> None:
    """aioquic <-> qh3 both ways, incl. aioquic's zero-padded client Initial into a qh3 server."""
    link = Link(load_engine(cname), load_engine(sname))
    link.handshake()
    assert "HandshakeCompleted" in _names(link.cevents) and "HandshakeCompleted" in _names(link.sevents)
    cert = link.cengine.peer_certificate(link.client)
    assert cert is not None and keys.fingerprint_of_certificate(cert) == keys.fingerprint(_KEY)
    payloads = [bytes([i]) * (100 + i) for i in range(20)]
    for p in payloads:
        link.client.send_datagram_frame(p)
        link.server.send_datagram_frame(p[::-1])
    for _ in range(5):
        link.step()
    assert link.received(link.sevents, link.sengine) == payloads
    assert link.received(link.cevents, link.cengine) == [p[::-1] for p in payloads]
    assert link.cengine.queue_depth(link.client) == 0
    assert link.cengine.smoothed_rtt(link.client) > 0


@pytest.mark.parametrize("name", ENGINES)
@pytest.mark.parametrize("mds", [1200, 1350, 1452])
def test_budget_is_the_largest_payload_that_is_sent(name: Engine, mds: int) -> None:
    """A payload of `budget` bytes goes out; the adapter never over-promises."""
    engine = load_engine(name)
    link = Link(engine, engine)
    link.handshake(mds)
    budget = engine.datagram_budget(link.client)
    # Exact for aioquic (8-byte CID, 2 bytes of packet-number margin); qh3
    # hides the peer CID, so 12 more bytes of margin (20-byte CID).
    assert mds - 30 - (14 if name is Engine.QH3 else 2) == budget
    link.client.send_datagram_frame(b"B" * budget)
    link.step()
    assert link.received(link.sevents, engine) == [b"B" * budget]


@pytest.mark.parametrize("name", ENGINES)
def test_peer_certificate_is_the_listener_node_key(name: Engine) -> None:
    """The listener's certificate really is the node key's (what the pin checks)."""
    engine = load_engine(name)
    link = Link(engine, engine)
    link.handshake()
    cert = engine.peer_certificate(link.client)
    assert keys.public_key_raw(cert.public_key()) == keys.public_key_raw(_KEY)
    assert engine.peer_certificate(link.server) is None  # the connector shows no certificate


# ---- congestion control of DATAGRAMs ------------------------------------------

OFFERED = 3000
PAYLOAD = 1200


def _flooded(name: Engine) -> tuple[EngineClasses, Link, int]:
    """A handshaken link whose client was just offered OFFERED datagrams; its congestion window before that."""
    engine = load_engine(name)
    link = Link(engine, engine)
    link.handshake()
    cwnd = _cwnd(engine, link.client)
    for i in range(OFFERED):
        link.client.send_datagram_frame(i.to_bytes(4, "big") + b"x" * (PAYLOAD - 4))
    return engine, link, cwnd


@pytest.mark.parametrize("name", ENGINES)
def test_datagrams_wait_for_the_congestion_window_when_nothing_is_acked(name: Engine) -> None:
    """With every packet lost, the sender emits about a window, not the offered load.

    Two simulated seconds of timers (PTO probes included) with no ACK reaching
    the sender: the bytes it put on the wire stay within a few congestion
    windows, and the rest stays queued (visible as queue depth).
    """
    engine, link, cwnd = _flooded(name)
    sent_bytes = 0
    for _ in range(2000):
        link.now += 0.001
        sent_bytes += sum(len(d) for d, _ in link.client.datagrams_to_send(now=link.now))
        link.fire_due_timers(link.client)
    offered_bytes = OFFERED * PAYLOAD
    assert sent_bytes <= 3 * cwnd, (sent_bytes, cwnd)
    assert sent_bytes < offered_bytes // 20
    assert engine.queue_depth(link.client) >= OFFERED - 3 * cwnd // PAYLOAD


@pytest.mark.parametrize("name", ENGINES)
def test_datagram_rate_follows_a_lossy_path(name: Engine) -> None:
    """On a path that drops every other packet, the window shrinks and the sender backs off.

    The receiver drains what arrives and ACKs it; the sender keeps being
    offered far more than the path carries. Congestion control must keep the
    packets sent per round trip near the (shrinking) window: over the run the
    sender emits a small fraction of the offered load and its window ends
    below where it started.
    """
    engine, link, start_cwnd = _flooded(name)
    sent = 0
    delivered = 0
    flip = False
    rtt = 0.02
    up: list[tuple[float, bytes]] = []  # (arrival time, datagram) toward the server
    down: list[tuple[float, bytes]] = []  # toward the client (ACKs), never lost
    for _ in range(300):  # 300 x 5 ms = 1.5 s, about 75 round trips
        link.now += 0.005
        for data, _ in link.client.datagrams_to_send(now=link.now):
            sent += 1
            flip = not flip
            if flip:  # every other packet is lost
                up.append((link.now + rtt / 2, data))
        due, up = [d for t, d in up if t <= link.now], [(t, d) for t, d in up if t > link.now]
        for data in due:
            link.server.receive_datagram(data, CLIENT_ADDR, now=link.now)
            delivered += 1
        for data, _ in link.server.datagrams_to_send(now=link.now):
            down.append((link.now + rtt / 2, data))
        due, down = [d for t, d in down if t <= link.now], [(t, d) for t, d in down if t > link.now]
        for data in due:
            link.client.receive_datagram(data, SERVER_ADDR, now=link.now)
        link._drain()
        link.fire_due_timers(link.client, link.server)
    assert delivered > 0
    assert sent < OFFERED // 2, sent
    assert _cwnd(engine, link.client) < start_cwnd
    assert len(link.received(link.sevents, engine)) >= delivered * 0.9


def _cwnd(engine: EngineClasses, conn: Any) -> int:
    if engine.name is Engine.QH3:
        return int(conn._core.congestion_window)
    return int(conn._loss.congestion_window)


def test_overhead_constant_covers_both_engines() -> None:
    # The qh3 gate charges each DATAGRAM this much packet overhead.
    assert QUIC_DATAGRAM_OVERHEAD_MAX == 1 + 20 + 4 + 16 + 1 + 2


@pytest.mark.skipif(not HAS_QH3, reason="qh3 not installed")
def test_raw_qh3_does_not_congestion_control_datagrams() -> None:
    """Documents why the adapter gates DATAGRAMs itself: qh3's core emits everything.

    If this starts failing, qh3 gained DATAGRAM congestion control and the gate
    in `Qh3Connection` may be dropped.
    """
    from qh3.quic.connection import QuicConnection

    base = load_engine(Engine.QH3)
    raw = dataclasses.replace(base, QuicConnection=QuicConnection)
    link = Link(raw, raw)
    link.handshake()
    for i in range(500):
        link.client.send_datagram_frame(b"x" * PAYLOAD)
    link.now += 0.001
    emitted = len(link.client.datagrams_to_send(now=link.now))
    assert emitted >= 400


@pytest.mark.parametrize(("sname", "cname"), ENGINE_PAIRS)
def test_receive_many_delivers_a_batch_like_one_by_one(sname: Engine, cname: Engine) -> None:
    """The batched receive path (one call per run of datagrams) gives the same DATAGRAMs in order,
    also during the handshake (padded Initials go through the one-by-one path)."""
    link = Link(load_engine(cname), load_engine(sname))
    link.start()
    for _ in range(25):  # handshake, every flight fed as one batch
        link.now += 0.005
        out = link.client.datagrams_to_send(now=link.now)
        if out and link.server is None:
            link.server = link.sengine.QuicConnection(configuration=_config(link.sengine, False, 1350),
                                                      original_destination_connection_id=initial_dcid(out[0][0]))
        if out:
            link.sengine.receive_many(link.server, [d for d, _ in out], CLIENT_ADDR, link.now)
        if link.server is not None:
            back = link.server.datagrams_to_send(now=link.now)
            if back:
                link.cengine.receive_many(link.client, [d for d, _ in back], SERVER_ADDR, link.now)
        link._drain()
    assert "HandshakeCompleted" in _names(link.sevents) and "HandshakeCompleted" in _names(link.cevents)
    payloads = [bytes([i]) * (200 + i) for i in range(40)]
    for p in payloads:
        link.client.send_datagram_frame(p)
    link.now += 0.005
    batch = [d for d, _ in link.client.datagrams_to_send(now=link.now)]
    assert len(batch) > 1
    link.sengine.receive_many(link.server, batch, CLIENT_ADDR, link.now)
    link._drain()
    got = link.received(link.sevents, link.sengine)
    assert len(got) > 1 and got == payloads[: len(got)]  # several from the one batch, in order
    for _ in range(10):
        link.step()
    assert link.received(link.sevents, link.sengine) == payloads


@pytest.mark.parametrize("name", ENGINES)
def test_stream_data_after_the_peer_closed_is_dropped_not_raised(name: Engine) -> None:
    """The peer's CLOSE and its CONNECTION_CLOSE can arrive in one batch: our reply
    to the first must not raise from the second (qh3's core refuses sends then)."""
    engine = load_engine(name)
    link = Link(engine, engine)
    link.handshake()
    sid = link.client.get_next_available_stream_id()
    link.client.send_stream_data(sid, b"hello")
    link.step()
    link.server.close(error_code=0x16, reason_phrase="bye")
    link.to_client(link.server.datagrams_to_send(now=link.now))  # the client is now draining
    link.client.send_stream_data(sid, b"reply nobody will read")  # must not raise
    assert link.client.datagrams_to_send(now=link.now) == []  # nothing is sent while draining
    link.now += 10
    link.client.handle_timer(now=link.now)
    link._drain()
    assert "ConnectionTerminated" in _names(link.cevents)


# ---- key update (RFC 9001, 6) ---------------------------------------------------


def _aioquic_phases(conn: Any) -> tuple[int, int]:
    """(send, receive) key phase of an aioquic connection's 1-RTT keys."""
    from aioquic import tls

    crypto = conn._cryptos[tls.Epoch.ONE_RTT]
    return crypto.send.key_phase, crypto.recv.key_phase


@pytest.mark.parametrize(("sname", "cname"), ENGINE_PAIRS)
def test_key_updates_both_ways_keep_datagrams_flowing(sname: Engine, cname: Engine) -> None:
    """Three updates from each side, every pairing: nothing is lost, and an aioquic
    end sees the key phase flip on the wire (header-protected, so only it can tell)."""
    link = Link(load_engine(cname), load_engine(sname))
    assert not link.cengine.update_keys(link.cengine.QuicConnection(configuration=_config(link.cengine, True)))
    link.handshake()
    sent: list[bytes] = []
    for round_ in range(6):
        side, engine = (link.client, link.cengine) if round_ % 2 == 0 else (link.server, link.sengine)
        assert engine.update_keys(side) is True
        for i in range(5):
            payload = bytes([round_, i]) * 50
            link.client.send_datagram_frame(payload)
            link.server.send_datagram_frame(payload[::-1])
            sent.append(payload)
        for _ in range(5):
            link.step()
        for conn, engine_ in ((link.client, link.cengine), (link.server, link.sengine)):
            if engine_.name is Engine.AIOQUIC:
                assert _aioquic_phases(conn) == ((round_ + 1) % 2, (round_ + 1) % 2)
    assert link.received(link.sevents, link.sengine) == sent
    assert link.received(link.cevents, link.cengine) == [p[::-1] for p in sent]
    assert "ConnectionTerminated" not in _names(link.cevents + link.sevents)


@pytest.mark.parametrize(("sname", "cname"), ENGINE_PAIRS)
def test_packets_sent_just_before_a_key_update_still_decrypt(sname: Engine, cname: Engine) -> None:
    """The server's packets under the old keys arrive after the client updated
    (they were in flight): an aioquic client opens them with the previous keys
    it kept (RFC 9001, 6.5) instead of losing them."""
    link = Link(load_engine(cname), load_engine(sname))
    link.handshake()
    for i in range(5):
        link.server.send_datagram_frame(b"old keys %d" % i)
    in_flight = link.server.datagrams_to_send(now=link.now)
    assert link.cengine.update_keys(link.client)
    link.client.send_datagram_frame(b"new keys")
    link.to_server(link.client.datagrams_to_send(now=link.now))  # the server follows the update
    link.server.send_datagram_frame(b"new keys back")
    fresh = link.server.datagrams_to_send(now=link.now)
    link.to_client(fresh + in_flight)  # the old ones arrive last (reordered)
    # qh3 2.1's core keeps no old keys: it loses them (this says when that changes).
    old = [b"old keys %d" % i for i in range(5)] if link.cengine.name is Engine.AIOQUIC else []
    assert sorted(link.received(link.cevents, link.cengine)) == sorted([b"new keys back", *old])
    assert link.received(link.sevents, link.sengine) == [b"new keys"]
    if link.cengine.name is Engine.AIOQUIC:
        assert _aioquic_phases(link.client) == (1, 1)


def test_warm_up_completes_a_handshake_with_every_engine_that_loads() -> None:
    """The spare worker's warm-up (issue 13): a real in-memory handshake per engine, not a no-op."""
    from l3ptp.worker.engine import available_engines
    from l3ptp.worker.warmup import warm_up

    assert warm_up() == available_engines()


# ---- qh3: the hot path around the core ----------------------------------------


def _qh3_link_with_batches(logger: Any = None) -> tuple[EngineClasses, Link]:
    engine = load_engine(Engine.QH3)
    link = Link(engine, engine)
    link.handshake()
    if logger is not None:
        for conn in (link.client, link.server):
            conn._quic_logger = logger.start_trace(is_client=conn._is_client, odcid=b"x")
    return engine, link


def _batch_step(engine: EngineClasses, link: Link) -> None:
    """One step of the worker's hot path: each side's datagrams_to_send, fed to the other as one batch."""
    link.now += 0.005
    for src, dst, addr in ((link.client, link.server, CLIENT_ADDR), (link.server, link.client, SERVER_ADDR)):
        out = [d for d, _ in src.datagrams_to_send(now=link.now)]
        if out:
            engine.receive_many(dst, out, addr, link.now)
    link._drain()


@pytest.mark.skipif(not HAS_QH3, reason="qh3 not installed")
def test_qh3_hot_path_does_no_qlog_work_without_a_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no qlog (the worker never sets one), sending and batched receiving go straight to qh3's core:
    qh3's own wrappers parse every sent packet's header and copy the packet for a logger that is not there."""
    from qh3.quic.connection import QuicConnection

    engine, link = _qh3_link_with_batches()

    def qlog_work(*args: Any) -> None:
        raise AssertionError("per-packet qlog work on the hot path")

    for name in ("_log_packets", "_log_packet", "_log_datagram", "_normalize_address"):
        monkeypatch.setattr(QuicConnection, name, qlog_work)
    payloads = [bytes([i]) * (300 + i) for i in range(60)]
    for p in payloads:
        link.client.send_datagram_frame(p)
        link.server.send_datagram_frame(p[::-1])
    for _ in range(10):
        _batch_step(engine, link)
    assert link.received(link.sevents, engine) == payloads
    assert link.received(link.cevents, engine) == [p[::-1] for p in payloads]


@pytest.mark.skipif(not HAS_QH3, reason="qh3 not installed")
def test_qh3_with_a_qlog_takes_qh3s_own_path() -> None:
    """A qlog (a debugging aid, not set by the worker) still sees every packet: qh3's own path is kept for it."""
    from qh3.quic.logger import QuicLogger

    logger = QuicLogger()
    engine, link = _qh3_link_with_batches(logger)
    payloads = [bytes([i]) * (900 + i) for i in range(20)]  # one per packet
    for p in payloads:
        link.client.send_datagram_frame(p)
    for _ in range(5):
        _batch_step(engine, link)
    assert link.received(link.sevents, engine) == payloads
    events = [e["name"] for trace in logger.to_dict()["traces"] for e in trace["events"]]
    assert events.count("transport:packet_sent") >= len(payloads)
    assert "transport:datagrams_received" in events


class _FailingCore:
    """qh3's core, except that `failing` raises RuntimeError as the core does on an internal error."""

    def __init__(self, core: Any, failing: str) -> None:
        self._core, self._failing = core, failing

    def __getattr__(self, name: str) -> Any:
        if name == self._failing:
            def fail(*args: Any) -> Any:
                raise RuntimeError(f"{name} failed")
            return fail
        return getattr(self._core, name)


@pytest.mark.skipif(not HAS_QH3, reason="qh3 not installed")
@pytest.mark.parametrize("failing", ["poll_transmit", "send_datagram", "receive_many_datagrams"])
def test_qh3_core_error_on_the_hot_path_closes_the_connection(failing: str) -> None:
    """An error of qh3's core on the hot path ends that connection (ConnectionTerminated, nothing more sent),
    like one through qh3's wrappers: never an exception into the worker's event loop."""
    engine, link = _qh3_link_with_batches()
    conn = link.server if failing == "receive_many_datagrams" else link.client
    conn._core = _FailingCore(conn._core, failing)
    link.client.send_datagram_frame(b"x" * 100)
    _batch_step(engine, link)
    events = link.sevents if conn is link.server else link.cevents
    closed = [e for e in events if isinstance(e, engine.events.ConnectionTerminated)]
    assert closed and f"{failing} failed" in closed[-1].reason_phrase
    assert conn.datagrams_to_send(now=link.now + 1) == []
