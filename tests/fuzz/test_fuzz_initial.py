"""Property tests for worker/initial.py, a parser of outside bytes: whatever arrives, it returns a value or
raises InitialError, and what it returns agrees with what was sent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from l3ptp.worker import initial as qi
from tests.support.quic_initial import aioquic_client, client_hello_of, crypto_frame, seal_initial

MANY = settings(max_examples=2000, deadline=None)


def read_datagram(data: bytes) -> list[tuple[int, bytes]]:
    try:
        h = qi.parse_initial_header(data)
        _, payload = qi.decrypt_initial(data, h)
        return qi.crypto_frames(payload)
    except qi.InitialError:
        return []


@MANY
@given(st.binary(max_size=1500))
def test_any_datagram_is_an_initial_or_an_initial_error(data: bytes) -> None:
    read_datagram(data)


@MANY
@given(st.binary(max_size=1500), st.binary(min_size=0, max_size=20), st.integers(0, 2**32 - 1), st.integers(1, 4),
       st.sampled_from(sorted(qi.VERSIONS)))
def test_any_payload_in_a_valid_initial_is_frames_or_an_initial_error(payload: bytes, dcid: bytes, pn: int,
                                                                      pn_len: int, version: int) -> None:
    pn %= 1 << (8 * pn_len)
    d = seal_initial(payload, dcid=dcid, pn=pn, pn_len=pn_len, version=version)
    h = qi.parse_initial_header(d)
    assert h.dcid == dcid and h.version == version
    got_pn, plain = qi.decrypt_initial(d, h)
    assert got_pn == pn and plain.startswith(payload)
    try:
        qi.crypto_frames(plain)
    except qi.InitialError:
        pass


@MANY
@given(st.binary(min_size=1, max_size=3000), st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 400)),
                                                       max_size=30))
def test_crypto_chunks_in_any_order_give_back_the_stream_or_an_initial_error(stream: bytes, cuts) -> None:  # type: ignore[no-untyped-def]
    asm = qi.CryptoAssembler(limit=2048)
    chunks = [(o, stream[o:o + n]) for o, n in cuts if o < len(stream)] + [(0, stream)]
    try:
        for offset, data in chunks:
            asm.add(offset, data)
    except qi.InitialError:
        assert len(stream) > 2048 or asm._pending_bytes > 0 or any(o + len(d) > 2048 for o, d in chunks)
        return
    assert bytes(asm.data) == stream
    try:
        asm.client_hello()
    except qi.InitialError:
        assert stream[0] != 1 or int.from_bytes(stream[1:4].ljust(3, b"\0"), "big") + 4 > 2048


@MANY
@given(st.binary(max_size=2500))
def test_any_client_hello_bytes_parse_or_raise_initial_error(body: bytes) -> None:
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    try:
        hello = qi.parse_client_hello(message)
    except qi.InitialError:
        return
    for prop in ("server_name", "alpn", "key_shares"):
        try:
            getattr(hello, prop)
        except qi.InitialError:
            pass
    assert len(hello.without_random()) == len(message)


@MANY
@given(st.integers(1, 1199), st.integers(0, 255))
def test_a_mutated_real_client_hello_parses_or_raises_initial_error(at: int, value: int) -> None:
    global _REAL
    if _REAL is None:
        _REAL = client_hello_of(aioquic_client(["h3"])[1]).raw
    raw = bytearray(_REAL)
    raw[at % len(raw)] = value
    frames = crypto_frame(0, bytes(raw))
    for offset, data in read_datagram(seal_initial(frames)):
        asm = qi.CryptoAssembler()
        try:
            asm.add(offset, data)
            message = asm.client_hello()
            if message is not None:
                hello = qi.parse_client_hello(message)
                hello.server_name, hello.alpn, hello.key_shares  # noqa: B018
        except qi.InitialError:
            pass


_REAL: bytes | None = None


@MANY
@given(st.binary(max_size=40), st.binary(max_size=200), st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=40),
                                                                        max_size=4))
def test_any_client_hello_fields_get_a_verdict_never_an_exception(random: bytes, ad: bytes, shares) -> None:  # type: ignore[no-untyped-def]
    from l3ptp.worker import reality

    cred = reality.Credential(private_key=bytes(range(32)))
    assert reality.open_random(cred, random, ad, shares, 1.8e9, reality.ReplayCache()) is not reality.Verdict.OK


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=1300), st.floats(0, 5)), max_size=40))
def test_the_gate_takes_any_datagrams_from_any_senders_within_its_bounds(events) -> None:  # type: ignore[no-untyped-def]
    from l3ptp.worker import reality
    from l3ptp.worker.reality_gate import Action, RealityGate

    gate = RealityGate(reality.Credential(private_key=bytes(range(32))), camouflage=True, max_pending=3)
    now = 0.0
    for sender, data, step in events:
        now += step
        d = gate.datagram(sender, data, now, 1.8e9)
        assert d.action is not Action.PASS and len(gate) <= 3
        gate.expire(now)
