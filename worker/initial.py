"""QUIC Initial packets of unauthenticated senders, read before any QUIC engine sees them.

A parser of outside bytes (anyone can send an Initial; its keys come from the
Destination Connection ID in clear, RFC 9001 5.2): the long header (RFC 9000
17.2.2), the client's Initial keys for QUIC v1 and v2 (RFC 9001 5.2, RFC 9369
3.3), header protection and AEAD (RFC 9001 5.3-5.4), the frames an Initial
may carry (RFC 9000 12.4), the CRYPTO stream reassembled within a bound (a
ClientHello may span several Initial packets), and the TLS 1.3 ClientHello
(RFC 8446 4.1.2). It is what issue 15's REALITY gate reads the client random
and key share from.

Every function takes bytes from the network and either returns a value or
raises `InitialError` with a reason; nothing else escapes (tests/fuzz). All
sizes are bounded by the input or by the constants below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["MAX_CRYPTO", "VERSIONS", "ClientHello", "CryptoAssembler", "InitialError", "InitialHeader",
           "InitialKeys", "crypto_frames", "decrypt_initial", "initial_keys", "parse_client_hello",
           "parse_initial_header"]

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
#: version -> (initial salt, label prefix, long-header type bits of an Initial)
VERSIONS = {
    QUIC_V1: (bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"), b"quic ", 0b00),
    QUIC_V2: (bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"), b"quicv2 ", 0b01),
}
MAX_CID = 20  # RFC 9000 17.2: a v1/v2 connection ID is at most 20 bytes
#: The CRYPTO bytes one client may send before its ClientHello is complete. A browser's ClientHello with an
#: ML-KEM hybrid share is about 1.8 kB; more than this is refused, never buffered.
MAX_CRYPTO = 16384
_SAMPLE = 16

FRAME_PADDING, FRAME_PING, FRAME_ACK, FRAME_ACK_ECN, FRAME_CRYPTO, FRAME_CLOSE = 0x00, 0x01, 0x02, 0x03, 0x06, 0x1C


class InitialError(ValueError):
    """The bytes are not a well-formed client Initial (or ClientHello); the message says why."""


class _Reader:
    """Bounds-checked reads from untrusted bytes."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise InitialError(f"{what}: {n} bytes wanted, {self.left()} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def varint(self, what: str) -> int:
        if self.left() < 1:
            raise InitialError(f"{what}: truncated")
        n = 1 << (self.data[self.pos] >> 6)
        raw = bytearray(self.take(n, what))
        raw[0] &= 0x3F
        return int.from_bytes(raw, "big")

    def vector(self, length_bytes: int, what: str) -> bytes:
        return self.take(self.uint(length_bytes, what), what)


# ---- the long header --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InitialHeader:
    version: int
    dcid: bytes
    scid: bytes
    token: bytes
    pn_offset: int  # where the (protected) packet number starts
    end: int  # where this packet ends in the datagram (coalesced packets may follow)


def parse_initial_header(data: bytes) -> InitialHeader:
    """The header of the Initial packet at the start of a UDP datagram; InitialError if it is not one."""
    r = _Reader(data)
    first = r.uint(1, "first byte")
    if not first & 0x80:
        raise InitialError("short header")
    version = r.uint(4, "version")
    if version not in VERSIONS:
        raise InitialError(f"version {version:#010x} not supported")
    if not first & 0x40:
        raise InitialError("fixed bit is 0")
    if (first >> 4) & 0x03 != VERSIONS[version][2]:
        raise InitialError("not an Initial packet")
    dcid_len = r.uint(1, "DCID length")
    if dcid_len > MAX_CID:
        raise InitialError(f"DCID of {dcid_len} bytes")
    dcid = r.take(dcid_len, "DCID")
    scid_len = r.uint(1, "SCID length")
    if scid_len > MAX_CID:
        raise InitialError(f"SCID of {scid_len} bytes")
    scid = r.take(scid_len, "SCID")
    token = r.take(r.varint("token length"), "token")
    length = r.varint("length")
    if length > r.left():
        raise InitialError(f"length {length} beyond the datagram ({r.left()} bytes left)")
    if length < 4 + _SAMPLE:
        raise InitialError(f"length {length} too short for a header-protection sample")
    return InitialHeader(version, dcid, scid, token, r.pos, r.pos + length)


# ---- keys and decryption ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InitialKeys:
    key: bytes
    iv: bytes
    hp: bytes


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with SHA-256, empty context."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(secret, block + info + bytes([i]), hashlib.sha256)
        out += block
        i += 1
    return out[:length]


def initial_keys(dcid: bytes, version: int = QUIC_V1, *, server: bool = False) -> InitialKeys:
    """The Initial packet protection keys of the client (or the server) for a first-flight DCID."""
    salt, prefix, _ = VERSIONS[version]
    initial = hmac.digest(salt, dcid, hashlib.sha256)  # HKDF-Extract
    secret = _expand_label(initial, b"server in" if server else b"client in", 32)
    return InitialKeys(_expand_label(secret, prefix + b"key", 16), _expand_label(secret, prefix + b"iv", 12),
                       _expand_label(secret, prefix + b"hp", 16))


def decrypt_initial(data: bytes, header: InitialHeader, keys: InitialKeys | None = None) -> tuple[int, bytes]:
    """(packet number, plaintext payload) of the Initial `header` describes; InitialError if it does not open."""
    keys = keys or initial_keys(header.dcid, header.version)
    sample = data[header.pn_offset + 4:header.pn_offset + 4 + _SAMPLE]
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first = data[0] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(b ^ m for b, m in zip(data[header.pn_offset:header.pn_offset + pn_len], mask[1:1 + pn_len]))
    pn = int.from_bytes(pn_bytes, "big")  # a client's first packets: the truncated number is the number
    aad = bytes([first]) + bytes(data[1:header.pn_offset]) + pn_bytes
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    try:
        payload = AESGCM(keys.key).decrypt(nonce, bytes(data[header.pn_offset + pn_len:header.end]), aad)
    except InvalidTag:
        raise InitialError("Initial does not decrypt with the keys of its DCID") from None
    return pn, payload


# ---- frames and the CRYPTO stream --------------------------------------------------------------------


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """The (offset, data) of every CRYPTO frame of an Initial payload; InitialError on a frame an Initial
    may not carry (RFC 9000 12.4) or a malformed one."""
    r = _Reader(payload)
    out = []
    while r.left():
        kind = r.varint("frame type")
        if kind == FRAME_PADDING or kind == FRAME_PING:
            continue
        if kind == FRAME_CRYPTO:
            offset = r.varint("CRYPTO offset")
            out.append((offset, r.take(r.varint("CRYPTO length"), "CRYPTO data")))
        elif kind in (FRAME_ACK, FRAME_ACK_ECN):
            r.varint("largest acknowledged"), r.varint("ACK delay")
            ranges = r.varint("ACK range count")
            if ranges > r.left():
                raise InitialError(f"{ranges} ACK ranges in {r.left()} bytes")
            r.varint("first ACK range")
            for _ in range(2 * ranges + (3 if kind == FRAME_ACK_ECN else 0)):
                r.varint("ACK field")
        elif kind == FRAME_CLOSE:
            r.varint("error code"), r.varint("frame type")
            r.take(r.varint("reason length"), "reason")
        else:
            raise InitialError(f"frame type {kind:#x} is not allowed in an Initial")
    return out


class CryptoAssembler:
    """One client's CRYPTO stream in the Initial space, in order, within `limit` bytes."""

    def __init__(self, limit: int = MAX_CRYPTO) -> None:
        self.limit = limit
        self.data = bytearray()
        self._pending: dict[int, bytes] = {}
        self._pending_bytes = 0

    def add(self, offset: int, data: bytes) -> None:
        if offset + len(data) > self.limit:
            raise InitialError(f"CRYPTO data beyond {self.limit} bytes")
        if offset + len(data) <= len(self.data):
            return  # a retransmission of what we have
        if offset > len(self.data):
            old = self._pending.get(offset, b"")
            if len(data) > len(old):
                self._pending_bytes += len(data) - len(old)
                self._pending[offset] = data
            if self._pending_bytes > self.limit:
                raise InitialError(f"more than {self.limit} bytes of CRYPTO data out of order")
            return
        self.data += data[len(self.data) - offset:]
        while self._pending:
            progressed = False
            for off in sorted(self._pending):
                if off <= len(self.data):
                    chunk = self._pending.pop(off)
                    self._pending_bytes -= len(chunk)
                    if off + len(chunk) > len(self.data):
                        self.data += chunk[len(self.data) - off:]
                    progressed = True
            if not progressed:
                break

    def client_hello(self) -> bytes | None:
        """The whole ClientHello handshake message once it is in, else None; InitialError if the stream
        starts with anything else."""
        if len(self.data) < 4:
            return None
        if self.data[0] != 0x01:
            raise InitialError(f"handshake message type {self.data[0]} where a ClientHello belongs")
        length = int.from_bytes(self.data[1:4], "big")
        if 4 + length > self.limit:
            raise InitialError(f"ClientHello of {length} bytes is over {self.limit}")
        return bytes(self.data[:4 + length]) if len(self.data) >= 4 + length else None


# ---- the ClientHello -----------------------------------------------------------------------------------

EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS, EXT_KEY_SHARE = 0x0000, 0x0010, 0x002B, 0x0033
RANDOM_OFFSET = 4 + 2  # in the handshake message: type (1), length (3), legacy_version (2)


@dataclasses.dataclass(frozen=True, slots=True)
class ClientHello:
    raw: bytes  # the whole handshake message
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    extensions: tuple[tuple[int, bytes], ...]  # in the order sent

    def extension(self, kind: int) -> bytes | None:
        return next((body for k, body in self.extensions if k == kind), None)

    @property
    def server_name(self) -> str | None:
        body = self.extension(EXT_SERVER_NAME)
        if body is None:
            return None
        r = _Reader(body)
        names = _Reader(r.vector(2, "server_name list"))
        while names.left():
            kind, name = names.uint(1, "name type"), names.vector(2, "host name")
            if kind == 0:
                return name.decode("ascii", "replace")
        return None

    @property
    def alpn(self) -> tuple[bytes, ...]:
        body = self.extension(EXT_ALPN)
        if body is None:
            return ()
        r = _Reader(_Reader(body).vector(2, "ALPN list"))
        out = []
        while r.left():
            out.append(r.vector(1, "protocol name"))
        return tuple(out)

    @property
    def key_shares(self) -> dict[int, bytes]:
        body = self.extension(EXT_KEY_SHARE)
        if body is None:
            return {}
        r = _Reader(_Reader(body).vector(2, "client_shares"))
        out = {}
        while r.left():
            group = r.uint(2, "group")
            out.setdefault(group, r.vector(2, "key_exchange"))
        return out

    def without_random(self) -> bytes:
        """The message with its random zeroed: what a MAC over the rest of the ClientHello covers."""
        return self.raw[:RANDOM_OFFSET] + bytes(32) + self.raw[RANDOM_OFFSET + 32:]


def parse_client_hello(message: bytes) -> ClientHello:
    """A TLS 1.3 ClientHello handshake message (with its 4-byte header); InitialError if malformed."""
    r = _Reader(message)
    if r.uint(1, "handshake type") != 0x01:
        raise InitialError("not a ClientHello")
    length = r.uint(3, "handshake length")
    if length != r.left():
        raise InitialError(f"ClientHello says {length} bytes, has {r.left()}")
    legacy_version = r.uint(2, "legacy_version")
    random = r.take(32, "random")
    session_id = r.vector(1, "legacy_session_id")
    if len(session_id) > 32:
        raise InitialError("legacy_session_id over 32 bytes")
    suites_raw = r.vector(2, "cipher_suites")
    if len(suites_raw) % 2 or not suites_raw:
        raise InitialError("cipher_suites malformed")
    suites = tuple(int.from_bytes(suites_raw[i:i + 2], "big") for i in range(0, len(suites_raw), 2))
    r.vector(1, "legacy_compression_methods")
    ext = _Reader(r.vector(2, "extensions"))
    if r.left():
        raise InitialError(f"{r.left()} bytes after the extensions")
    extensions, seen = [], set()
    while ext.left():
        kind = ext.uint(2, "extension type")
        if kind in seen:
            raise InitialError(f"extension {kind:#06x} twice")  # RFC 8446 4.2
        seen.add(kind)
        extensions.append((kind, ext.vector(2, f"extension {kind:#06x}")))
    return ClientHello(bytes(message), legacy_version, random, session_id, suites, tuple(extensions))
