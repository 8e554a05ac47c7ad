"""Build client Initial packets with any payload (RFC 9001 5): for fuzzing worker/initial.py past its AEAD."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from l3ptp.worker import initial as qi


ADDR = ("198.18.0.2", 443)


def aioquic_client(alpn: list[str], server_name: str = "site.test"):  # type: ignore[no-untyped-def]
    """A connecting aioquic client and the datagrams of its first flight."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=alpn,
                                                          server_name=server_name))
    conn.connect(ADDR, now=0.0)
    return conn, [d for d, _ in conn.datagrams_to_send(now=0.0)]


def client_hello_of(datagrams: list[bytes]) -> qi.ClientHello:
    """The ClientHello the Initials in `datagrams` carry, read with worker/initial.py."""
    asm = qi.CryptoAssembler()
    for d in datagrams:
        h = qi.parse_initial_header(d)
        _, payload = qi.decrypt_initial(d, h)
        for offset, data in qi.crypto_frames(payload):
            asm.add(offset, data)
    message = asm.client_hello()
    assert message is not None
    return qi.parse_client_hello(message)


def varint(v: int) -> bytes:
    for n, tag in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if v < 1 << (8 * n - 2):
            raw = bytearray(v.to_bytes(n, "big"))
            raw[0] |= tag
            return bytes(raw)
    raise ValueError(v)


def seal_initial(payload: bytes, *, dcid: bytes = bytes(8), scid: bytes = b"", pn: int = 0, pn_len: int = 2,
                 version: int = qi.QUIC_V1, token: bytes = b"") -> bytes:
    """One protected client Initial carrying `payload` (padded with PADDING so a sample exists)."""
    keys = qi.initial_keys(dcid, version)
    payload = payload + bytes(max(0, 20 - pn_len - len(payload)))
    first = 0xC0 | (qi.VERSIONS[version][2] << 4) | (pn_len - 1)
    length = pn_len + len(payload) + 16
    head = (bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
            + varint(len(token)) + token + varint(length))
    pn_bytes = pn.to_bytes(pn_len, "big")
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(keys.key).encrypt(nonce, payload, head + pn_bytes)
    sample = sealed[4 - pn_len:4 - pn_len + 16]
    enc = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    masked_first = first ^ (mask[0] & 0x0F)
    masked_pn = bytes(b ^ m for b, m in zip(pn_bytes, mask[1:1 + pn_len]))
    return bytes([masked_first]) + head[1:] + masked_pn + sealed


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data
