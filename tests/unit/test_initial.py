"""worker/initial.py against Initials real QUIC clients build (aioquic; qh3 when installed) and RFC 9001's
own example; malformed input is in tests/fuzz/test_fuzz_initial.py."""

from __future__ import annotations

import importlib.util
import itertools

import pytest

from l3ptp.worker import initial as qi
from tests.support.quic_initial import ADDR, aioquic_client, client_hello_of


def test_rfc9001_appendix_a_client_initial_keys() -> None:
    keys = qi.initial_keys(bytes.fromhex("8394c8f03e515708"))
    assert keys.key.hex() == "1f369613dd76d5467730efcbe3b1a22d"
    assert keys.iv.hex() == "fa044b2f42a3fd3b46fb255c"
    assert keys.hp.hex() == "9f50449e04a0e810283a1e9933adedd2"
    server = qi.initial_keys(bytes.fromhex("8394c8f03e515708"), server=True)
    assert server.key.hex() == "cf3a5331653c364c88f0f379b6067e37"


def test_rfc9369_v2_client_initial_keys() -> None:
    keys = qi.initial_keys(bytes.fromhex("8394c8f03e515708"), qi.QUIC_V2)
    assert keys.key.hex() == "8b1a0bc121284290a29e0971b5cd045d"
    assert keys.iv.hex() == "91f73e2351d8fa91660e909f"
    assert keys.hp.hex() == "45b95e15235d6f45a6b19cbcb0294ba9"


def test_an_aioquic_initial_is_read_to_its_client_hello() -> None:
    conn, datagrams = aioquic_client(["h3"])
    h = qi.parse_initial_header(datagrams[0])
    assert h.version == qi.QUIC_V1 and h.dcid == conn._peer_cid.cid and h.scid == conn.host_cid and h.token == b""
    hello = client_hello_of(datagrams)
    assert hello.random == conn.tls.client_random
    assert hello.server_name == "site.test" and hello.alpn == (b"h3",) and hello.session_id == b""
    assert len(hello.key_shares[0x001D]) == 32  # X25519
    assert hello.legacy_version == 0x0303 and 0x1301 in hello.cipher_suites
    z = hello.without_random()
    assert len(z) == len(hello.raw) and hello.random not in z and z[qi.RANDOM_OFFSET:qi.RANDOM_OFFSET + 32] == bytes(32)


def test_a_client_hello_over_several_initials_is_reassembled_in_any_order() -> None:
    alpn = [f"proto-{i:03d}-{'x' * 40}" for i in range(40)]  # about 2 kB of ALPN: more than one Initial
    conn, datagrams = aioquic_client(alpn)
    assert len(datagrams) >= 2
    for order in itertools.permutations(datagrams):
        hello = client_hello_of(list(order))
        assert hello.random == conn.tls.client_random and len(hello.alpn) == 40


def test_a_client_hello_is_none_until_it_is_complete() -> None:
    _, datagrams = aioquic_client([f"p{i:02d}{'y' * 50}" for i in range(40)])
    asm = qi.CryptoAssembler()
    h = qi.parse_initial_header(datagrams[0])
    for offset, data in qi.crypto_frames(qi.decrypt_initial(datagrams[0], h)[1]):
        asm.add(offset, data)
    assert asm.client_hello() is None


@pytest.mark.skipif(importlib.util.find_spec("qh3") is None, reason="qh3 not installed")
def test_a_qh3_initial_is_read_to_its_client_hello() -> None:
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["h3"],
                                                          server_name="site.test"))
    conn.connect(ADDR, now=0.0)
    hello = client_hello_of([d for d, _ in conn.datagrams_to_send(now=0.0)])
    assert hello.server_name == "site.test" and hello.alpn == (b"h3",) and len(hello.random) == 32
    assert hello.key_shares  # qh3 offers X25519 (and may offer a hybrid share)


def test_a_coalesced_packet_after_the_initial_is_not_read_as_part_of_it() -> None:
    _, datagrams = aioquic_client(["h3"])
    h = qi.parse_initial_header(datagrams[0] + b"\x40" * 30)
    assert h.end <= len(datagrams[0])
    qi.decrypt_initial(datagrams[0] + b"\x40" * 30, h)


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: b"\x40" + d[1:], "short header"),
    (lambda d: d[:1] + b"\x00\x00\x00\x02" + d[5:], "version"),
    (lambda d: bytes([d[0] | 0x30]) + d[1:], "not an Initial"),
    (lambda d: d[:5] + b"\x15" + d[6:], "DCID of 21"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "does not decrypt"),
    (lambda d: d[:40], "beyond the datagram"),
])
def test_what_is_not_a_client_initial_is_refused_with_a_reason(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    _, datagrams = aioquic_client(["h3"])
    with pytest.raises(qi.InitialError, match=reason):
        d = mutate(datagrams[0])
        qi.decrypt_initial(d, qi.parse_initial_header(d))


def test_frames_an_initial_may_not_carry_are_refused() -> None:
    with pytest.raises(qi.InitialError, match="0x8 is not allowed"):
        qi.crypto_frames(b"\x08\x00\x00")  # STREAM
    assert qi.crypto_frames(b"\x00\x01\x06\x05\x02hi\x00\x00") == [(5, b"hi")]
    assert qi.crypto_frames(b"\x02\x03\x00\x01\x00\x00\x00") == []  # ACK with one extra range


def test_the_assembler_is_bounded() -> None:
    asm = qi.CryptoAssembler(limit=100)
    with pytest.raises(qi.InitialError, match="beyond 100"):
        asm.add(90, b"x" * 20)
    asm = qi.CryptoAssembler(limit=100)
    asm.add(10, b"y" * 50)
    asm.add(10, b"y" * 50)  # the same chunk again: counted once
    with pytest.raises(qi.InitialError, match="out of order"):
        asm.add(61, b"z" * 39) or asm.add(60, b"w" * 1) or asm.add(30, b"v" * 70)
    asm = qi.CryptoAssembler()
    asm.add(0, b"\x02\x00\x00\x01x")
    with pytest.raises(qi.InitialError, match="where a ClientHello belongs"):
        asm.client_hello()


def test_the_assembler_keeps_order_and_ignores_retransmissions() -> None:
    asm = qi.CryptoAssembler()
    asm.add(4, b"5678")
    asm.add(0, b"1234")
    asm.add(2, b"34567")
    asm.add(8, b"9")
    assert bytes(asm.data) == b"123456789" and not asm._pending and asm._pending_bytes == 0


def test_a_client_hello_with_an_extension_twice_is_refused() -> None:
    _, datagrams = aioquic_client(["h3"])
    hello = client_hello_of(datagrams)
    kind, body = hello.extensions[0]
    ext = b"".join(k.to_bytes(2, "big") + len(b).to_bytes(2, "big") + b for k, b in [*hello.extensions, (kind, body)])
    r = hello.raw
    head = r[4:4 + 2 + 32]
    rest = r[4 + 34:]
    sid_len = rest[0]
    rest = rest[1 + sid_len:]
    suites_len = int.from_bytes(rest[:2], "big")
    suites = rest[:2 + suites_len]
    comp = rest[2 + suites_len:2 + suites_len + 1 + rest[2 + suites_len]]
    body2 = head + bytes([sid_len]) + hello.session_id + suites + comp + len(ext).to_bytes(2, "big") + ext
    with pytest.raises(qi.InitialError, match="twice"):
        qi.parse_client_hello(b"\x01" + len(body2).to_bytes(3, "big") + body2)
