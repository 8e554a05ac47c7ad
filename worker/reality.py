"""REALITY authentication inside the QUIC first flight (issue 15): the sans-I/O cryptography.

The connector proves that it holds the listener's REALITY public key inside
its TLS ClientHello, so that the listener can tell its peer from everyone
else from the first Initial, before it answers anything (XTLS REALITY's QUIC
variant, shared/docs/anchors/quic-tunnels.md B2):

    shared   = X25519(client's TLS X25519 key share, listener's static REALITY key)
    ad       = the ClientHello handshake message with its 32-byte random zeroed
    h        = SHA-256(ad)
    key      = HKDF-SHA256(ikm=shared, salt=h[0:20], info="l3ptp reality v1", L=16)
    random   = AES-128-GCM(key, nonce=h[20:32], aad=ad,
                           plaintext = version (1) | reserved (3, zero) | unix time (4, big endian) | short id (8))

The 16-byte plaintext seals to 16 bytes of ciphertext and a 16-byte tag:
exactly the client random, which looks random to anyone without the
listener's private key. The tag covers the whole rest of the ClientHello
(SNI, ALPN, the key share itself), so the random cannot be lifted into a
prober's own ClientHello; a replay of the very same ClientHello is refused by
`ReplayCache` within the time window, and outside it by the time check; a
replayer also lacks the ephemeral private key and could not finish TLS.

Everything here takes outside bytes and returns a `Verdict` (counted by the
caller, never raised); only `seal_random` is for the connector's own use.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["AUTH_VERSION", "GROUP_X25519", "MAX_SKEW", "REPLAY_CAPACITY", "Credential", "ReplayCache", "Verdict",
           "open_random", "seal_random", "shared_secret"]

AUTH_VERSION = 1
GROUP_X25519 = 0x001D
#: A ClientHello whose time is further than this from the listener's clock is refused (stale or future).
MAX_SKEW = 90.0
#: Randoms remembered against replay; a full cache refuses new authentications (counted) rather than forget.
REPLAY_CAPACITY = 4096
_INFO = b"l3ptp reality v1"
_PLAIN = struct.Struct("!B3xI8s")  # version, reserved, unix time, short id: 16 bytes


class Verdict(enum.Enum):
    """What the listener concluded about one ClientHello; everything but OK sends it to the camouflage."""

    OK = "ok"
    NO_X25519 = "no_x25519_share"  # nothing to authenticate with: an ordinary client
    BAD_TAG = "bad_tag"  # not sealed with our key: an ordinary client or a prober
    BAD_VERSION = "bad_version"
    STALE = "stale_time"
    UNKNOWN_SHORT_ID = "unknown_short_id"
    REPLAY = "replay"
    REPLAY_FULL = "replay_cache_full"


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """The listener's side: its static X25519 key and the short ids it accepts (empty: any)."""

    private_key: bytes  # 32 raw bytes
    short_ids: frozenset[bytes] = frozenset()

    @property
    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        raw = serialization.Encoding.Raw
        return X25519PrivateKey.from_private_bytes(self.private_key).public_key().public_bytes(
            raw, serialization.PublicFormat.Raw)


def shared_secret(private_key: bytes, public_key: bytes) -> bytes | None:
    """X25519 of raw keys; None for a public key that gives the all-zero secret (a low-order point)."""
    try:
        out = X25519PrivateKey.from_private_bytes(private_key).exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        return None
    return out


def _key_and_nonce(shared: bytes, ad: bytes) -> tuple[bytes, bytes]:
    h = hashlib.sha256(ad).digest()
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=h[:20], info=_INFO).derive(shared)
    return key, h[20:32]


def seal_random(shared: bytes, ad: bytes, now: float, short_id: bytes = bytes(8)) -> bytes:
    """The connector's 32-byte client random for the ClientHello `ad` (its random zeroed)."""
    if len(short_id) > 8:
        raise ValueError("a short id is at most 8 bytes")
    key, nonce = _key_and_nonce(shared, ad)
    return AESGCM(key).encrypt(nonce, _PLAIN.pack(AUTH_VERSION, int(now) & 0xFFFFFFFF, short_id.ljust(8, b"\0")), ad)


class ReplayCache:
    """The randoms accepted within the last 2 x `window` seconds, at most `capacity` of them."""

    def __init__(self, window: float = MAX_SKEW, capacity: int = REPLAY_CAPACITY) -> None:
        self.window, self.capacity = window, capacity
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            random, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[random]

    def check_and_add(self, random: bytes, now: float) -> Verdict:
        self._expire(now)
        if random in self._seen:
            return Verdict.REPLAY
        if len(self._seen) >= self.capacity:
            return Verdict.REPLAY_FULL
        self._seen[random] = now + 2 * self.window
        return Verdict.OK


def open_random(credential: Credential, hello_random: bytes, ad: bytes, key_shares: dict[int, bytes], now: float,
                replay: ReplayCache | None = None, max_skew: float = MAX_SKEW) -> Verdict:
    """The listener's check of one ClientHello (its random, the message with the random zeroed, its key shares)."""
    share = key_shares.get(GROUP_X25519)
    if share is None or len(share) != 32 or len(hello_random) != 32:
        return Verdict.NO_X25519
    shared = shared_secret(credential.private_key, share)
    if shared is None:
        return Verdict.BAD_TAG
    key, nonce = _key_and_nonce(shared, ad)
    try:
        plain = AESGCM(key).decrypt(nonce, hello_random, ad)
    except InvalidTag:
        return Verdict.BAD_TAG
    version, when, short_id = _PLAIN.unpack(plain)
    if version != AUTH_VERSION:
        return Verdict.BAD_VERSION
    # The time is 32-bit unix seconds; compare modulo 2**32 so that 2106 is no cliff.
    skew = ((when - int(now)) + 2**31) % 2**32 - 2**31
    if abs(skew) > max_skew:
        return Verdict.STALE
    if credential.short_ids and short_id not in {s.ljust(8, b"\0") for s in credential.short_ids}:
        return Verdict.UNKNOWN_SHORT_ID
    return replay.check_and_add(hello_random, now) if replay is not None else Verdict.OK
