"""One UDP port per network (worker/steering.py): every connection ID a worker issues, and every destination CID
it connects with, names its queue (`cid[0] % queues == queue`), in both engines; datagrams for another queue
are counted and dropped. In memory, no socket (the kernel side: tests/privileged/test_shared_port.py)."""

from __future__ import annotations

from typing import Any

import pytest

from l3ptp.ipc.constants import ALPN
from l3ptp.ipc.counters import DropReason
from l3ptp.worker import keys
from l3ptp.worker.admission import Admission, parse_initial
from l3ptp.worker.engine import available_engines, load_engine
from l3ptp.worker.steering import QueueGate, cid_source, dcid_queue, pin_queue, queue_cid
from l3ptp.worker.warmup import exchange

QUEUES, QUEUE = 3, 2
ENGINES = available_engines()


def test_queue_cid_always_names_its_queue_and_covers_every_first_byte_of_it() -> None:
    for queues in (2, 3, 5, 64):
        for queue in range(queues):
            firsts = {queue_cid(queue, queues, 8)[0] for _ in range(3000)}
            assert all(b % queues == queue for b in firsts)
            assert firsts == {b for b in range(256) if b % queues == queue} or queues == 2  # 2: 128 values, likely all
            assert len(queue_cid(queue, queues, 20)) == 20


def test_dcid_queue_reads_the_byte_the_helpers_program_reads() -> None:
    assert dcid_queue(b"\x40\x05" + bytes(20), 3) == 2  # short header: byte 1
    assert dcid_queue(b"\xc0\x00\x00\x00\x01\x08\x07" + bytes(20), 3) == 1  # long header: byte 6
    assert dcid_queue(b"\xc0\x00\x00\x00\x01\x08", 3) is None  # too short: the program drops it too
    assert dcid_queue(b"", 3) is None


def _handshake(engine_name: Any, pinned: bool) -> tuple[list[bytes], list[bytes], Any, Any]:
    """Client and server of `engine_name` (pinned to QUEUE of QUEUES, or raw) through their handshake and a
    PING (worker/warmup.py's in-memory pair): (every DCID the client sent, every CID the server issued, client,
    server)."""
    e = load_engine(engine_name)
    if pinned:
        e = pin_queue(e, QUEUE, QUEUES)
    key = keys.generate_private_key()
    ccfg = e.QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    e.configure_tls(ccfg, True, key, None)
    scfg = e.QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    e.configure_tls(scfg, False, key, keys.self_signed_certificate(key))
    client = e.QuicConnection(configuration=ccfg)
    client.connect(("127.0.0.1", 1), now=0.0)
    dcids: list[bytes] = []
    events: list[tuple[str, Any]] = []

    def on_round(rnd: int, out: list[bytes], server: Any) -> None:
        if rnd == 20:
            client.send_ping(1)
        dcids.extend(d[6:14] if d[0] & 0x80 else d[1:9] for d in out)

    server, done = exchange(e, client, scfg, 40, until_done=False, on_round=on_round, events=events)
    assert done
    issued = [_first_host_cid(server)] + [ev.connection_id for who, ev in events
                                          if who == "server" and isinstance(ev, e.events.ConnectionIdIssued)]
    return dcids, issued, client, server


def _first_host_cid(server: Any) -> bytes:
    first = getattr(server, "_local_initial_source_connection_id", None)  # aioquic: its handshake CID
    return first if first is not None else server.host_cid


@pytest.mark.parametrize("engine", ENGINES)
def test_pinned_connections_issue_and_address_only_their_queues_cids(engine: Any) -> None:
    dcids, issued, _, _ = _handshake(engine, pinned=True)
    assert dcids and issued
    assert all(c[0] % QUEUES == QUEUE for c in dcids), [c.hex() for c in dcids]  # the first Initial's too
    if str(engine) == "qh3":  # its Rust core issues one spare CID we cannot choose (worker/engine_qh3.py)
        issued = issued[:1]
    assert all(c[0] % QUEUES == QUEUE for c in issued), [c.hex() for c in issued]


@pytest.mark.parametrize("engine", ENGINES)
def test_without_the_hook_the_engines_cids_land_on_any_queue(engine: Any) -> None:
    """What the hook is for: the raw engines' CIDs are random, so some name another queue (this would be the
    same assertion as above failing). aioquic issues 7 NEW_CONNECTION_IDs, qh3 at least 1."""
    names = set()
    for _ in range(4):
        dcids, issued, _, _ = _handshake(engine, pinned=False)
        names |= {c[0] % QUEUES for c in (*dcids, *issued)}
    assert names != {QUEUE}


def test_qh3_pinned_server_issues_at_most_one_spare_cid() -> None:
    """qh3's core draws NEW_CONNECTION_ID CIDs in Rust: the pinned class keeps it to the one spare CID RFC 9000's
    least limit (2) implies; raw qh3 issues more to an aioquic-like peer limit (here its own client's: 2)."""
    if "qh3" not in [str(e) for e in ENGINES]:
        pytest.skip("qh3 is not installed")
    _, issued, _, server = _handshake(next(e for e in ENGINES if str(e) == "qh3"), pinned=True)
    assert issued[0] == server.host_cid and issued[0][0] % QUEUES == QUEUE and len(issued) <= 2


def test_retry_source_cids_name_the_queue() -> None:
    class Cfg:
        queue, queues = QUEUE, QUEUES

    adm = Admission(randbytes=cid_source(Cfg()))  # type: ignore[arg-type]
    initial = parse_initial(_raw_initial())
    assert initial is not None
    for _ in range(50):
        retry = adm.retry_packet(initial, ("198.18.0.2", 4433), 0.0)
        dcid_len = retry[5]
        scid = retry[7 + dcid_len:7 + dcid_len + retry[6 + dcid_len]]
        assert len(scid) == 8 and scid[0] % QUEUES == QUEUE


def _raw_initial() -> bytes:
    e = load_engine(ENGINES[0])
    cfg = e.QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    e.configure_tls(cfg, True, keys.generate_private_key(), None)
    client = e.QuicConnection(configuration=cfg)
    client.connect(("127.0.0.1", 1), now=0.0)
    return client.datagrams_to_send(now=0.0)[0][0]


class _Base:
    def _route(self, data: bytes, addr: Any, now: float) -> str:
        return "routed"


class _Gated(QueueGate, _Base):
    def __init__(self, shared: bool) -> None:
        from l3ptp.ipc.control_messages import UnderlayPorts
        from l3ptp.ipc.types import PeerRole

        class Cfg:
            queue, queues, role = QUEUE, QUEUES, PeerRole.LISTEN
            ports = UnderlayPorts.SHARED if shared else UnderlayPorts.PER_QUEUE

        self.config = Cfg()  # type: ignore[assignment]
        self._drops = {r: 0 for r in DropReason}


def test_a_datagram_for_another_queue_is_counted_and_dropped_on_a_shared_port() -> None:
    gate = _Gated(shared=True)
    mine, other = b"\x40" + bytes([QUEUE]) + bytes(20), b"\x40" + bytes([QUEUE + 1]) + bytes(20)
    initial_other = b"\xc0\x00\x00\x00\x01\x08" + bytes([QUEUE + 4]) + bytes(1200)
    assert gate._route(mine, ("198.18.0.2", 1), 0.0) == "routed"
    assert gate._route(other, ("198.18.0.2", 1), 0.0) is None
    assert gate._route(initial_other, ("198.18.0.2", 1), 0.0) is None  # never reaches admission
    assert gate._drops[DropReason.DGRAM_WRONG_QUEUE] == 2
    per_queue = _Gated(shared=False)
    assert per_queue._route(other, ("198.18.0.2", 1), 0.0) == "routed"
    assert per_queue._drops[DropReason.DGRAM_WRONG_QUEUE] == 0


def test_another_queues_packet_draws_no_restart_hint_on_a_shared_port() -> None:
    """`Tunnel._hint` answers an unknown short-header packet with RESTART_HINT, but not one naming another queue:
    that connection is alive at its own worker (a hint would make its connector probe for nothing)."""
    from l3ptp.worker.policy import RESTART_HINT
    from l3ptp.worker.tunnel import Tunnel

    sent: list[bytes] = []

    class Hinting(_Gated):
        reality, _peer_ip = None, None
        core = type("Core", (), {"restart_hint": staticmethod(lambda now: True)})()
        sock = type("Sock", (), {"sendto": staticmethod(lambda data, addr: sent.append(data))})()

    mine, other = b"\x40" + bytes([QUEUE]) + bytes(40), b"\x40" + bytes([QUEUE + 1]) + bytes(40)
    for shared, data, hinted in ((True, other, False), (True, mine, True), (False, other, True)):
        sent.clear()
        Tunnel._hint(Hinting(shared), data, ("198.18.0.2", 1), 0.0)  # type: ignore[arg-type]
        assert sent == ([RESTART_HINT] if hinted else []), (shared, data[1])
