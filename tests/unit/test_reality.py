"""REALITY inside the first flight (worker/reality.py, worker/reality_engine.py): a real aioquic or qh3
connector's Initial, read with worker/initial.py, authenticates with the listener's key and nothing else."""

from __future__ import annotations

import importlib.util
import os

import pytest

from l3ptp.worker import initial as qi
from l3ptp.worker import reality
from l3ptp.worker.reality_engine import connect_sealed
from tests.support.quic_initial import ADDR, client_hello_of

ENGINES = ["aioquic"] + (["qh3"] if importlib.util.find_spec("qh3") else [])
NOW = 1_800_000_000.0
LISTENER = reality.Credential(private_key=os.urandom(32), short_ids=frozenset({b"\x01\x02"}))


def first_flight(engine: str, server_public: bytes | None, *, short_id: bytes = b"\x01\x02", when: float = NOW,
                 server_name: str = "www.site.test") -> qi.ClientHello:
    mod = importlib.import_module(f"{engine}.quic.connection")
    cfg = importlib.import_module(f"{engine}.quic.configuration")
    conn = mod.QuicConnection(configuration=cfg.QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                                                  server_name=server_name))
    if server_public is None:
        conn.connect(ADDR, now=0.0)
    else:
        connect_sealed(conn, ADDR, 0.0, server_public, short_id, clock=lambda: when)
    hello = client_hello_of([d for d, _ in conn.datagrams_to_send(now=0.0)])
    assert hello.random == conn.tls.client_random
    return hello


def verdict(hello: qi.ClientHello, *, now: float = NOW, cred: reality.Credential = LISTENER,
            replay: reality.ReplayCache | None = None) -> reality.Verdict:
    return reality.open_random(cred, hello.random, hello.without_random(), hello.key_shares, now, replay)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_sealed_first_flight_authenticates_and_an_ordinary_one_does_not(engine: str) -> None:
    hello = first_flight(engine, LISTENER.public_key)
    assert verdict(hello) is reality.Verdict.OK
    assert hello.session_id == b""  # nothing outside the random: the ClientHello is the engine's own
    assert verdict(first_flight(engine, None)) is reality.Verdict.BAD_TAG


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_is_left_as_it_was_after_connect(engine: str) -> None:
    tls = importlib.import_module(f"{engine}.tls")
    before = tls.push_client_hello
    first_flight(engine, LISTENER.public_key)
    assert tls.push_client_hello is before
    assert verdict(first_flight(engine, None)) is reality.Verdict.BAD_TAG  # the next plain client is plain


@pytest.mark.parametrize("engine", ENGINES)
def test_refusals_name_their_reason(engine: str) -> None:
    other = reality.Credential(private_key=os.urandom(32))
    assert verdict(first_flight(engine, other.public_key)) is reality.Verdict.BAD_TAG  # a wrong key
    assert verdict(first_flight(engine, LISTENER.public_key, when=NOW - 91)) is reality.Verdict.STALE
    assert verdict(first_flight(engine, LISTENER.public_key, when=NOW + 91)) is reality.Verdict.STALE
    assert verdict(first_flight(engine, LISTENER.public_key, when=NOW - 89)) is reality.Verdict.OK
    assert verdict(first_flight(engine, LISTENER.public_key, short_id=b"\x09")) is reality.Verdict.UNKNOWN_SHORT_ID
    anyone = reality.Credential(private_key=LISTENER.private_key)  # no short ids configured: any is accepted
    assert verdict(first_flight(engine, LISTENER.public_key, short_id=b"\x09"), cred=anyone) is reality.Verdict.OK


@pytest.mark.parametrize("engine", ENGINES)
def test_a_replayed_client_hello_is_refused_and_a_lifted_random_does_not_authenticate(engine: str) -> None:
    cache = reality.ReplayCache()
    hello = first_flight(engine, LISTENER.public_key)
    assert verdict(hello, replay=cache) is reality.Verdict.OK
    assert verdict(hello, replay=cache, now=NOW + 30) is reality.Verdict.REPLAY
    # A prober copies the random into its own ClientHello (its own key share, SNI...): the tag covers them.
    own = first_flight(engine, None, server_name="www.site.test")
    lifted = own.raw[:qi.RANDOM_OFFSET] + hello.random + own.raw[qi.RANDOM_OFFSET + 32:]
    assert verdict(qi.parse_client_hello(lifted), replay=cache) is reality.Verdict.BAD_TAG
    # Changing anything else of the sealed hello (here: its SNI) breaks the tag too.
    renamed = hello.raw.replace(b"www.site.test", b"www.site.tesu")
    assert verdict(qi.parse_client_hello(renamed)) is reality.Verdict.BAD_TAG


def test_no_x25519_share_is_no_authentication() -> None:
    assert reality.open_random(LISTENER, bytes(32), b"ad", {0x0017: b"p256"}, NOW) is reality.Verdict.NO_X25519
    assert reality.open_random(LISTENER, bytes(32), b"ad", {0x001D: b"short"}, NOW) is reality.Verdict.NO_X25519
    # A low-order point gives an all-zero secret: refused, never used as a key.
    assert reality.open_random(LISTENER, bytes(32), b"ad", {0x001D: bytes(32)}, NOW) is reality.Verdict.BAD_TAG


def test_the_replay_cache_expires_and_is_bounded() -> None:
    cache = reality.ReplayCache(window=10.0, capacity=2)
    assert cache.check_and_add(b"a", 0.0) is reality.Verdict.OK
    assert cache.check_and_add(b"b", 1.0) is reality.Verdict.OK
    assert cache.check_and_add(b"c", 2.0) is reality.Verdict.REPLAY_FULL  # refused, nothing forgotten early
    assert cache.check_and_add(b"a", 19.0) is reality.Verdict.REPLAY
    assert cache.check_and_add(b"c", 20.0) is reality.Verdict.OK  # a expired at 20
    assert len(cache) == 2


def test_seal_and_open_round_trip_also_where_32_bit_time_wraps() -> None:
    client = reality.Credential(private_key=os.urandom(32))
    shared = reality.shared_secret(client.private_key, LISTENER.public_key)
    assert shared is not None
    when = 2.0**32 + 5  # the year 2106: the sealed time wrapped to 5
    sealed = reality.seal_random(shared, b"the rest of the hello", when, b"\x01\x02")
    shares = {reality.GROUP_X25519: client.public_key}
    assert reality.open_random(LISTENER, sealed, b"the rest of the hello", shares, when - 3) is reality.Verdict.OK
    assert reality.open_random(LISTENER, sealed, b"another hello", shares, when) is reality.Verdict.BAD_TAG
    with pytest.raises(ValueError):
        reality.seal_random(shared, b"x", NOW, bytes(9))
