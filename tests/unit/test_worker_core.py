"""The tunnel's sans-I/O core (worker/core.py) driven as an in-memory pair with a fake clock.

Like aioquic's and wireguard-go's tests: two cores, a connector's and a listener's, with time passed
in; no socket, no event loop. The pair stands in for the shell: a connection attempt of the
connector becomes a candidate of the listener, `establish` makes both ends ESTABLISHED, `exchange`
moves DATAGRAMs between them (both count them, as the shell's counters do).
"""

from __future__ import annotations

import pytest

from l3ptp.ipc.constants import (
    CANDIDATE_DATAGRAMS_MAX,
    CANDIDATE_LIFETIME,
    MAX_CANDIDATES,
    RECONNECT_BACKOFF_MAX,
    RECONNECT_BACKOFF_MIN,
)
from l3ptp.worker.core import PeerPolicy, TunnelCore
from l3ptp.worker.policy import HINT_EVERY, PROBE_TIMEOUT, START_HINTS

#: The jitter the fake random source gives: every delay is 0.75 of the backoff.
JITTER = 0.75


class End:
    """One end: its core, its DATAGRAM counter (sent + received) and its active connection's policy."""

    def __init__(self, core: TunnelCore) -> None:
        self.core = core
        self.packets = 0
        self.active: PeerPolicy | None = None


class Pair:
    def __init__(self, *, packets: int = 100, interval: float = 60.0, max_candidates: int | None = None) -> None:
        self.now = 1000.0
        kw = dict(random=lambda: 0.5, key_update_packets=packets, key_update_interval=interval)
        self.connector = End(TunnelCore(**kw))
        self.listener = End(TunnelCore(**kw, max_candidates=max_candidates))
        #: The listener's candidates by address, oldest first.
        self.candidates: dict[str, PeerPolicy] = {}

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def connect(self, addr: str = "198.19.0.2:4000") -> PeerPolicy | None:
        """The connector starts an attempt; the listener admits it if the core finds room."""
        self.connector.active = self.connector.core.connecting(self.now)
        core = self.listener.core
        if not core.room(len(self.candidates), addr in self.candidates):
            return None
        cand = self.candidates[addr] = core.admitted(self.now)
        return cand

    def establish(self, addr: str = "198.19.0.2:4000") -> None:
        cand = self.candidates.pop(addr)
        self.listener.active = cand
        for end in (self.connector, self.listener):
            assert end.active is not None
            end.core.established(end.active, self.now, end.packets)

    def exchange(self, n: int) -> None:
        """n DATAGRAMs from the connector to the listener: each end counts them under its key."""
        self.connector.packets += n
        self.listener.packets += n

    def session_ends(self) -> float:
        """The connector's session ended: the delay its core waits before reconnecting."""
        self.connector.active = None
        return self.connector.core.session_ended(self.now) - self.now


def test_reconnect_backoff_grows_to_its_cap_and_resets_when_a_session_is_established() -> None:
    pair = Pair()
    core = pair.connector.core
    pair.connect()
    expected = RECONNECT_BACKOFF_MIN
    delays = []
    for _ in range(12):
        delay = pair.session_ends()
        delays.append(delay)
        assert delay == pytest.approx(expected * JITTER)
        assert not core.reconnect_due(pair.now)
        assert core.deadlines(None, False, ()) == [core.reconnect_at]
        pair.advance(delay - 1e-6)
        assert not core.reconnect_due(pair.now)
        pair.advance(1e-6)
        assert core.reconnect_due(pair.now)
        pair.connect()
        assert core.reconnect_at is None and not core.reconnect_due(pair.now)
        expected = min(expected * 2, RECONNECT_BACKOFF_MAX)
    assert delays[1] == pytest.approx(2 * delays[0])
    assert delays[-1] == pytest.approx(RECONNECT_BACKOFF_MAX * JITTER)
    pair.establish()
    assert pair.session_ends() == pytest.approx(RECONNECT_BACKOFF_MIN * JITTER)
    assert pair.session_ends() == pytest.approx(2 * RECONNECT_BACKOFF_MIN * JITTER)


def test_jitter_spans_half_to_all_of_the_backoff() -> None:
    for r, factor in ((0.0, 0.5), (0.5, 0.75), (0.999, 0.9995)):
        core = TunnelCore(random=lambda r=r: r)
        assert core.session_ended(10.0) == pytest.approx(10.0 + RECONNECT_BACKOFF_MIN * factor)


def test_a_failed_probe_reconnects_at_once_from_the_shortest_backoff() -> None:
    pair = Pair()
    core = pair.connector.core
    pair.connect()
    for _ in range(4):
        pair.session_ends()
    pair.connect()
    pair.establish()
    peer = pair.connector.active
    assert peer is not None
    assert core.probe(peer, pair.now, "icmp", 0.01) == (True, 1)
    assert core.deadlines(peer, True, ())[-1] == pytest.approx(pair.now + PROBE_TIMEOUT + 0.03)
    assert core.probe(peer, pair.now, "hint", 0.01) == (False, None)  # a hint does not move it
    pair.advance(0.1)
    assert core.probe(peer, pair.now, "icmp", 0.01) == (True, None)  # a further ICMP error does
    pair.advance(PROBE_TIMEOUT)
    assert not core.probe_expired(peer, pair.now)
    pair.advance(0.03)
    assert core.probe_expired(peer, pair.now) and peer.probe_at is None
    pair.session_ends()
    core.reconnect_now(pair.now)
    assert core.reconnect_due(pair.now)
    pair.connect()
    assert pair.session_ends() == pytest.approx(RECONNECT_BACKOFF_MIN * JITTER)


def test_an_acknowledged_probe_ends_without_a_reconnect() -> None:
    pair = Pair()
    pair.connect()
    pair.establish()
    core, peer = pair.connector.core, pair.connector.active
    assert peer is not None
    assert core.probe(peer, pair.now, "hint", 0.0) == (True, 1)
    core.ping_acked(peer, 0)  # another PING's ACK
    assert peer.probe_at is not None
    core.ping_acked(peer, 1)
    pair.advance(10.0)
    assert not core.probe_expired(peer, pair.now) and core.reconnect_at is None


def test_key_update_triggers_by_packet_count_at_both_ends() -> None:
    pair = Pair(packets=100, interval=60.0)
    pair.connect()
    pair.establish()
    pair.exchange(99)
    for end in (pair.connector, pair.listener):
        assert end.active is not None
        assert not end.core.key_update_due_by_packets(end.active, end.packets)
        assert not end.core.key_update_due(end.active, pair.now, end.packets)
    pair.exchange(1)
    for end in (pair.connector, pair.listener):
        assert end.active is not None
        assert end.core.key_update_due_by_packets(end.active, end.packets)
        assert end.core.key_update_due(end.active, pair.now, end.packets)
    end = pair.connector
    assert end.active is not None
    end.core.key_updated(end.active, pair.now, end.packets, ok=True)
    assert end.core.key_updates == 1
    pair.exchange(99)
    assert not end.core.key_update_due(end.active, pair.now, end.packets)
    pair.exchange(1)
    assert end.core.key_update_due(end.active, pair.now, end.packets)


def test_key_update_triggers_by_elapsed_time_without_traffic() -> None:
    pair = Pair(packets=100, interval=60.0)
    pair.connect()
    pair.establish()
    end = pair.listener
    assert end.active is not None
    assert end.core.deadlines(end.active, True, ()) == [pair.now + 60.0]
    pair.advance(59.9)
    assert not end.core.key_update_due(end.active, pair.now, end.packets)
    pair.advance(0.1)
    assert end.core.key_update_due(end.active, pair.now, end.packets)
    assert not end.core.key_update_due_by_packets(end.active, end.packets)
    end.core.key_updated(end.active, pair.now, end.packets, ok=True)
    assert end.core.key_updates == 1 and end.core.deadlines(end.active, True, ()) == [pair.now + 60.0]
    assert not end.core.key_update_due(end.active, pair.now, end.packets)


def test_a_refused_key_update_is_retried_within_a_second() -> None:
    pair = Pair(packets=100, interval=60.0)
    pair.connect()
    pair.establish()
    end = pair.connector
    assert end.active is not None
    pair.advance(60.0)
    end.core.key_updated(end.active, pair.now, end.packets, ok=False)
    assert end.core.key_updates == 0
    assert not end.core.key_update_due(end.active, pair.now, end.packets)  # a deadline in the past would spin
    pair.advance(1.0)
    assert end.core.key_update_due(end.active, pair.now, end.packets)
    short = TunnelCore(random=lambda: 0.5, key_update_interval=0.2)
    peer = short.connecting(0.0)
    short.key_updated(peer, 0.0, 0, ok=False)
    assert peer.rekey_at == pytest.approx(0.2)


def test_candidates_are_admitted_up_to_the_limit_and_an_attempt_evicts_the_oldest() -> None:
    pair = Pair(max_candidates=3)
    core = pair.listener.core
    addrs = [f"198.19.0.{i}:4000" for i in range(2, 6)]
    for i, addr in enumerate(addrs[:3]):
        assert pair.connect(addr) is not None
        pair.advance(1.0)
    assert core.start_hints_left == 0
    assert pair.connect(addrs[3]) is None  # the table is full
    assert pair.connect(addrs[1]) is not None  # a known address replaces its own
    assert core.evict(pair.candidates) == addrs[0]
    del pair.candidates[core.evict(pair.candidates)]
    assert pair.connect(addrs[3]) is not None
    assert list(pair.candidates) == addrs[1:]
    assert TunnelCore(random=lambda: 0.5).max_candidates == MAX_CANDIDATES


def test_a_candidate_expires_after_its_lifetime() -> None:
    pair = Pair()
    core = pair.listener.core
    cand = pair.connect()
    assert cand is not None
    assert core.deadlines(None, False, [cand]) == [pair.now + CANDIDATE_LIFETIME]
    pair.advance(CANDIDATE_LIFETIME - 0.01)
    assert not core.candidate_expired(cand, pair.now)
    pair.advance(0.01)
    assert core.candidate_expired(cand, pair.now)
    assert pair.connector.active is not None
    assert not core.candidate_expired(pair.connector.active, pair.now + 1e9)  # a connector's never does


def test_a_candidate_takes_only_its_handshakes_initials_and_only_as_many_datagrams_as_a_handshake_needs() -> None:
    pair = Pair()
    core = pair.listener.core
    cand = pair.connect()
    assert cand is not None
    cid = bytes(range(8))
    initial = bytes([0xC0, 0, 0, 0, 1, len(cid)]) + cid + bytes(1200)
    other = bytes([0xC0, 0, 0, 0, 1, len(cid)]) + bytes(8) + bytes(1200)
    assert not core.candidate_datagram(cand, other, (cid,))
    assert not core.candidate_datagram(cand, initial[:6], (cid,))
    assert core.candidate_datagram(cand, b"", (cid,))
    assert core.candidate_datagram(cand, initial, (cid,))
    while cand.datagrams < CANDIDATE_DATAGRAMS_MAX:
        assert core.candidate_datagram(cand, b"\x40short", (cid,))
    assert not core.candidate_datagram(cand, initial, (cid,))


def test_start_hints_and_restart_hints_are_paced() -> None:
    core = TunnelCore(random=lambda: 0.5)
    now = 5.0
    core.start_hints()
    sent = 0
    while core.start_hint(now):
        sent += 1
        assert core.deadlines(None, False, ()) == ([now + HINT_EVERY] if sent < START_HINTS else [])
        assert not core.start_hint_due(now + HINT_EVERY - 1e-6)
        now += HINT_EVERY
        assert core.start_hint_due(now) == (sent < START_HINTS)
    assert sent == START_HINTS
    assert core.restart_hint(now) and not core.restart_hint(now + HINT_EVERY / 2)
    assert core.restart_hint(now + HINT_EVERY)


def test_no_key_update_is_due_before_the_session_is_established() -> None:
    """FIX: a new connection's schedule used to start at 0 packets, so every received batch during the
    handshake asked the engine for a key update it could only refuse."""
    core = TunnelCore(random=lambda: 0.5, key_update_packets=100, key_update_interval=10.0)
    peer = core.connecting(0.0)
    assert not core.key_update_due_by_packets(peer, 5) and not core.key_update_due(peer, 1e6, 5)
    core.established(peer, 1.0, 5)
    assert not core.key_update_due_by_packets(peer, 104) and core.key_update_due_by_packets(peer, 105)
    assert core.key_update_due(peer, 11.0, 6)
