"""Admission of new QUIC connections: budgets, stateless Retry, tokens (worker/admission.py)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l3ptp.ipc.constants import (
    NEW_CONN_BURST,
    NEW_CONN_PER_SOURCE_BURST,
    RETRY_BURST,
    RETRY_TOKEN_LIFETIME,
    VALIDATED_CONN_BURST,
)
from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.counters import DropReason
from l3ptp.worker.admission import Admission, Admit, TokenBucket, parse_initial
from l3ptp.worker.engine import load_engine
from tests.support.worker_fixtures import ENGINE_PAIRS, ENGINES
from tests.unit.test_worker_engine import CLIENT_ADDR, SERVER_ADDR, _config, _names

PEER = ("198.18.0.2", 40000)


def _client_initial(engine: Engine = Engine.AIOQUIC):
    e = load_engine(engine)
    client = e.QuicConnection(configuration=_config(e, True))
    client.connect(SERVER_ADDR, now=0.0)
    return client, client.datagrams_to_send(now=0.0)[0][0]


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.ready(0.05) and b.take(0.1) and not b.take(0.1)
    assert b.take(100.0) and b.tokens == 2.0  # never more than the burst


@pytest.mark.parametrize("engine", ENGINES)
def test_parse_initial_reads_a_real_client_initial(engine: Engine) -> None:
    client, data = _client_initial(engine)
    initial = parse_initial(data)
    assert initial is not None and initial.version == 1 and initial.token == b""
    assert initial.dcid == client.original_destination_connection_id if engine is Engine.AIOQUIC else len(initial.dcid) == 8
    assert len(initial.scid) == 8
    assert parse_initial(b"\x40" + bytes(40)) is None  # short header
    assert parse_initial(data[:10]) is None  # truncated
    assert parse_initial(b"\xc0\x00\x00\x00\x02" + data[5:]) is None  # another version


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_parse_initial_never_raises(blob: bytes) -> None:
    parse_initial(b"\xc3\x00\x00\x00\x01" + blob)
    parse_initial(blob)


def test_retry_token_bound_to_address_cids_and_time() -> None:
    a = Admission(key=b"k" * 32)
    token = a.make_token(PEER, b"odcid-12", b"scid-123", now=100.0)
    assert a.check_token(token, PEER, b"scid-123", 101.0) == Admit(b"odcid-12", b"scid-123")
    assert a.check_token(token, ("198.18.0.2", 40001), b"scid-123", 101.0) is None  # another port
    assert a.check_token(token, ("198.18.0.3", 40000), b"scid-123", 101.0) is None  # another host
    assert a.check_token(token, PEER, b"other-id", 101.0) is None  # not the Retry's CID
    assert a.check_token(token, PEER, b"scid-123", 100.0 + RETRY_TOKEN_LIFETIME + 0.1) is None  # expired
    assert a.check_token(token, PEER, b"scid-123", 99.0) is None  # from the future
    tampered = token[:-1] + bytes([token[-1] ^ 1])
    assert a.check_token(tampered, PEER, b"scid-123", 101.0) is None
    assert Admission(key=b"j" * 32).check_token(token, PEER, b"scid-123", 101.0) is None  # another worker
    assert a.check_token(b"short", PEER, b"scid-123", 101.0) is None


def test_unloaded_listener_admits_at_once_without_retry() -> None:
    """A legitimate peer's reconnect is not slowed down when nobody floods."""
    _, data = _client_initial()
    a = Admission()
    assert isinstance(a.decide(data, PEER, 0.0, room=True), Admit)


def test_budgets_per_source_then_retry_then_drop() -> None:
    _, data = _client_initial()
    a = Admission()
    out = [a.decide(data, (PEER[0], 40000 + i), 0.0, room=True) for i in range(NEW_CONN_PER_SOURCE_BURST + 1)]
    assert all(isinstance(d, Admit) for d in out[:-1])
    assert isinstance(out[-1], bytes) and out[-1][0] & 0xF0 == 0xF0  # a Retry (long header, type 3)
    # Other sources share the total budget.
    more = [a.decide(data, (f"198.18.1.{i}", 1), 0.0, room=True) for i in range(NEW_CONN_BURST)]
    admitted = NEW_CONN_PER_SOURCE_BURST + sum(isinstance(d, Admit) for d in more)
    assert admitted == NEW_CONN_BURST
    # Then Retry answers, within their own budget, then drops.
    rest = [a.decide(data, (PEER[0], 50000 + i), 0.0, room=True) for i in range(RETRY_BURST + 10)]
    assert DropReason.INITIAL_OVER_BUDGET in rest
    assert sum(isinstance(d, bytes) for d in rest) + sum(isinstance(d, bytes) for d in out + more) == RETRY_BURST
    # Then, until the next Retry token is due, Initials without a token are not
    # even parsed (junk counts as over budget, not as malformed) ...
    junk = b"\xc3\x00\x00\x00\x02\x00\x00\x00" + os.urandom(1300)
    assert a.decide(junk, PEER, 0.001, room=True) is DropReason.INITIAL_OVER_BUDGET
    # ... while one with a token is still looked at (a validated peer may pass).
    assert a.decide(junk[:7] + b"\x01" + junk[8:], PEER, 0.001, room=True) is DropReason.INITIAL_MALFORMED
    assert a.decide(junk, PEER, 1.0, room=True) is DropReason.INITIAL_MALFORMED  # the gate opened again
    # Budgets come back with time.
    assert isinstance(a.decide(data, ("198.18.9.9", 1), 10.0, room=True), Admit)


def test_full_candidate_table_means_retry_not_a_new_candidate() -> None:
    _, data = _client_initial()
    a = Admission()
    assert isinstance(a.decide(data, PEER, 0.0, room=False), bytes)


def test_malformed_and_forged_tokens_are_named_drops() -> None:
    client, data = _client_initial()
    a = Admission()
    assert a.decide(b"\xc3\x00\x00\x00\x01\xff" + bytes(1300), PEER, 0.0, room=True) is DropReason.INITIAL_MALFORMED
    # An Initial with a token we never made.
    forged = bytearray(data)
    initial = parse_initial(data)
    assert initial is not None
    offset = 6 + len(initial.dcid) + 1 + len(initial.scid)
    assert forged[offset] == 0  # empty token: make it one byte long, eating into the length field
    forged[offset] = 1
    assert a.decide(bytes(forged), PEER, 0.0, room=True) is DropReason.INITIAL_BAD_TOKEN


@pytest.mark.parametrize(("sname", "cname"), ENGINE_PAIRS)
def test_client_follows_retry_and_the_validated_server_completes_the_handshake(sname: Engine, cname: Engine) -> None:
    """Both engines, as client, answer our Retry with a tokened Initial; the
    server connection built with the token's CIDs completes the handshake (the
    client checks original_destination_connection_id and
    retry_source_connection_id in the transport parameters)."""
    ce, se = load_engine(cname), load_engine(sname)
    client = ce.QuicConnection(configuration=_config(ce, True))
    client.connect(SERVER_ADDR, now=0.0)
    a = Admission()
    first = client.datagrams_to_send(now=0.0)[0][0]
    retry = a.decide(first, CLIENT_ADDR, 0.0, room=False)
    assert isinstance(retry, bytes)
    client.receive_datagram(retry, SERVER_ADDR, now=0.01)
    second = client.datagrams_to_send(now=0.01)
    assert parse_initial(second[0][0]).token  # type: ignore[union-attr]
    admit = a.decide(second[0][0], CLIENT_ADDR, 0.01, room=False)
    assert isinstance(admit, Admit) and admit.retry_scid is not None
    server = se.QuicConnection(configuration=_config(se, False), original_destination_connection_id=admit.original_dcid,
                               retry_source_connection_id=admit.retry_scid)
    cev, sev = [], []
    now = 0.01
    pending = second
    for _ in range(20):
        for data, _ in pending:
            server.receive_datagram(data, CLIENT_ADDR, now=now)
        now += 0.001
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, SERVER_ADDR, now=now)
        for conn, out in ((client, cev), (server, sev)):
            while (ev := conn.next_event()) is not None:
                out.append(ev)
        pending = client.datagrams_to_send(now=now)
    assert "HandshakeCompleted" in _names(cev) and "HandshakeCompleted" in _names(sev)
    assert "ConnectionTerminated" not in _names(cev) | _names(sev)


def test_a_token_replayed_from_another_port_is_refused() -> None:
    client, first = _client_initial()
    a = Admission()
    retry = a.decide(first, PEER, 0.0, room=False)
    client.receive_datagram(retry, SERVER_ADDR, now=0.01)
    tokened = client.datagrams_to_send(now=0.01)[0][0]
    assert a.decide(tokened, (PEER[0], PEER[1] + 1), 0.02, room=False) is DropReason.INITIAL_BAD_TOKEN
    assert isinstance(a.decide(tokened, PEER, 0.02, room=False), Admit)
    for _ in range(VALIDATED_CONN_BURST):
        a.decide(tokened, PEER, 0.02, room=False)
    assert a.decide(tokened, PEER, 0.02, room=False) is DropReason.INITIAL_OVER_BUDGET
