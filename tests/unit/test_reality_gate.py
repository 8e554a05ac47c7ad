"""The listener's REALITY gate and relay table (worker/reality_gate.py) with real aioquic first flights."""

from __future__ import annotations

import os

import pytest

from l3ptp.worker import reality
from l3ptp.worker.reality_engine import connect_sealed
from l3ptp.worker.reality_gate import Action, RealityGate, RelayTable
from tests.support.quic_initial import ADDR, aioquic_client

NOW = 1_800_000_000.0
CRED = reality.Credential(private_key=os.urandom(32))


def sealed_flight(alpn: list[str] | None = None, key: bytes | None = None) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=alpn or ["h3"],
                                                          server_name="www.site.test"))
    connect_sealed(conn, ADDR, 0.0, key or CRED.public_key, clock=lambda: NOW)
    return [d for d, _ in conn.datagrams_to_send(now=0.0)]


def feed(gate: RealityGate, sender: object, datagrams: list[bytes], t: float = 0.0):  # type: ignore[no-untyped-def]
    return [gate.datagram(sender, d, t, NOW) for d in datagrams]


def test_our_peer_passes_with_everything_it_sent_and_others_go_to_the_camouflage() -> None:
    gate = RealityGate(CRED, camouflage=True)
    flight = sealed_flight([f"p{i:02d}{'y' * 50}" for i in range(40)])  # several Initials
    assert len(flight) >= 2
    *first, last = feed(gate, "peer", flight)
    assert all(d.action is Action.PENDING for d in first)
    assert last.action is Action.PASS and last.datagrams == tuple(flight)
    plain = aioquic_client(["h3"])[1]
    (d,) = feed(gate, "prober", plain[:1])
    assert d.action is Action.RELAY and d.reason == "bad_tag" and d.datagrams == (plain[0],)
    assert len(gate) == 0  # nothing kept once decided


def test_without_a_target_refusals_are_silent_drops() -> None:
    gate = RealityGate(CRED, camouflage=False)
    (d,) = feed(gate, "prober", aioquic_client(["h3"])[1][:1])
    assert d.action is Action.DROP and d.reason == "bad_tag"
    (d,) = feed(gate, "x", [b"\x40" + os.urandom(50)])
    assert d.action is Action.DROP and d.reason == "not_initial"


def test_a_replayed_sealed_flight_and_a_wrong_key_are_refused_by_name() -> None:
    gate = RealityGate(CRED, camouflage=True)
    flight = sealed_flight()
    assert feed(gate, "peer", flight[:1])[0].action is Action.PASS
    (d,) = feed(gate, "replayer", flight[:1])
    assert d.action is Action.RELAY and d.reason == "replay"
    (d,) = feed(gate, "stranger", sealed_flight(key=reality.Credential(os.urandom(32)).public_key)[:1])
    assert d.reason == "bad_tag"


def test_pending_senders_are_bounded_in_number_time_and_datagrams() -> None:
    gate = RealityGate(CRED, camouflage=True, max_pending=2, pending_timeout=2.0)
    half = sealed_flight([f"p{i:02d}{'y' * 50}" for i in range(40)])[:1]  # never completed
    assert feed(gate, "a", half)[0].action is Action.PENDING
    assert feed(gate, "b", half)[0].action is Action.PENDING
    (d,) = feed(gate, "c", half)
    assert d.action is Action.RELAY and d.reason == "pending_full"
    assert gate.expire(1.0) == []
    late = dict(gate.expire(2.5))
    assert set(late) == {"a", "b"} and late["a"].reason == "pending_timeout" and late["a"].datagrams == tuple(half)
    # The same first Initial again and again (a client retransmitting): at most 8 are buffered.
    results = feed(gate, "d", half * 9)
    assert [r.action for r in results] == [Action.PENDING] * 8 + [Action.RELAY]
    assert results[-1].reason == "pending_datagrams" and len(results[-1].datagrams) == 9


def test_a_sender_switching_connection_ids_mid_hello_is_refused() -> None:
    gate = RealityGate(CRED, camouflage=True)
    a = sealed_flight([f"p{i:02d}{'y' * 50}" for i in range(40)])
    b = sealed_flight([f"p{i:02d}{'y' * 50}" for i in range(40)])
    assert feed(gate, "s", a[:1])[0].action is Action.PENDING
    (d,) = feed(gate, "s", b[1:2])
    assert d.action is Action.RELAY and d.reason == "pending_mismatch" and d.datagrams == (a[0], b[1])


def test_relay_flows_are_bounded_rate_limited_and_expire() -> None:
    table = RelayTable(max_flows=2, idle=30.0, rate=3000)
    assert table.open("a", 0.0) and table.open("b", 0.0) and table.open("a", 0.0)
    assert not table.open("c", 0.0)
    assert table.upstream("a", 2000, 0.0) and not table.upstream("a", 2000, 0.0)  # 1000 tokens left
    assert table.downstream("a", 3000, 0.0)  # each direction has its own budget
    assert table.upstream("a", 2000, 0.5)  # 1000 + 0.5 s x 3000, capped at 3000
    assert table.flows["a"].dropped == 1 and table.flows["a"].bytes_up == 4000
    assert not table.upstream("nobody", 1, 0.0)  # never a flow that was not opened: no open proxy
    assert table.expire(30.2) == ["b"] and "a" in table
    assert table.expire(61.0) == ["a"]


@pytest.mark.parametrize("junk", [b"", b"\xc0", os.urandom(1200), b"\xc0\x00\x00\x00\x01" + os.urandom(1195)])
def test_junk_from_a_new_sender_is_refused_without_state(junk: bytes) -> None:
    gate = RealityGate(CRED, camouflage=False)
    (d,) = feed(gate, "j", [junk])
    assert d.action is Action.DROP and len(gate) == 0


def test_new_senders_are_examined_within_a_budget_and_the_rest_refused_unexamined(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of senders costs at most `new_sender_rate` examinations (decryption, X25519) a second."""
    examined = []
    real = reality.open_random
    monkeypatch.setattr(reality, "open_random", lambda *a, **kw: examined.append(1) or real(*a, **kw))
    gate = RealityGate(CRED, camouflage=True, new_sender_rate=50)
    plain = aioquic_client(["h3"])[1][:1]
    decisions = [gate.datagram(("198.18.9.9", port), plain[0], 0.0, NOW) for port in range(1000, 1200)]
    assert [d.reason for d in decisions].count("bad_tag") == 50 == len(examined)
    over = [d for d in decisions if d.reason == "over_budget"]
    assert len(over) == 150 and all(d.action is Action.RELAY and d.datagrams == (plain[0],) for d in over)
    # The budget refills with time: our peer gets through a second later, examined.
    flight = sealed_flight()
    assert feed(gate, "peer", flight[:1], t=1.0)[0].action is Action.PASS
    assert len(gate) == 0
