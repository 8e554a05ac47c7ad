"""Admission of new QUIC connections on a listener: budgets and stateless Retry.

Every UDP datagram that looks like a QUIC Initial and belongs to no known
connection is a connection attempt. Building a connection costs a TLS
handshake; a flood of attempts (junk Initials, or real ones replayed from many
source ports) must not take the worker's time from the established session.
`Admission.decide` is the cheap gate in front of that, pure (no I/O, the clock
passed in):

1. An Initial without a token is *admitted* while the budget for
   unvalidated attempts has room, in total and for its source address, and
   the candidate table is not full: a legitimate peer's reconnect is never
   slowed down when nobody floods.
2. Otherwise the worker is under load: the Initial is answered with a
   stateless Retry (RFC 9000, 8.1.2) carrying a token bound to the source
   address and port, the original destination CID and the time, MACed with a
   per-worker random key. Nothing is kept. Retry answers have a budget too.
3. An Initial with a token is admitted only if the token verifies (and its
   own budget has room); the connection is then told the original and the
   Retry CIDs (transport parameters of RFC 9000, 7.3).
4. Everything else is dropped, each under a named `DropReason`:
   ``initial_malformed``, ``initial_bad_token``, ``initial_over_budget``,
   ``initial_retry`` (answered with a Retry instead of a connection).

When the budgets for unvalidated attempts and for Retry answers are spent,
an Initial without a token is dropped after a float comparison and two byte
reads, until the next Retry token is due: under a flood of 100k+ Initials a
second the gate must cost about what reading the datagram costs, or the
socket buffer overflows and the established session's packets are lost with
the junk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
from typing import Any

from l3ptp.ipc.constants import (
    ADMISSION_SOURCES_MAX,
    NEW_CONN_BURST,
    NEW_CONN_PER_SOURCE_BURST,
    NEW_CONN_PER_SOURCE_RATE,
    NEW_CONN_RATE,
    RETRY_BURST,
    RETRY_RATE,
    RETRY_TOKEN_LIFETIME,
    VALIDATED_CONN_BURST,
    VALIDATED_CONN_RATE,
)
from l3ptp.ipc.counters import DropReason

__all__ = ["Admit", "Admission", "Initial", "TokenBucket", "has_token", "parse_initial"]

_QUIC_V1 = 0x00000001
_CID_MAX = 20
_MAC_LEN = 16
_STAMP = struct.Struct("!d")
#: Our Retry source CIDs are this long (both engines use 8-byte CIDs).
_RETRY_CID_LEN = 8


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def ready(self, now: float) -> bool:
        return self._refill(now) >= 1.0

    def take(self, now: float) -> bool:
        if self._refill(now) < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class Initial:
    version: int
    dcid: bytes
    scid: bytes
    token: bytes


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    first = data[offset]
    size = 1 << (first >> 6)
    if offset + size > len(data):
        raise IndexError
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[offset + i]
    return value, offset + size


def parse_initial(data: bytes) -> Initial | None:
    """The header fields of a QUIC v1 Initial (long header, type 0), else None."""
    try:
        if len(data) < 7 or (data[0] & 0xF0) != 0xC0:
            return None
        version = int.from_bytes(data[1:5], "big")
        if version != _QUIC_V1:
            return None
        dlen = data[5]
        if dlen > _CID_MAX:
            return None
        dcid = data[6:6 + dlen]
        offset = 6 + dlen
        slen = data[offset]
        if slen > _CID_MAX:
            return None
        scid = data[offset + 1:offset + 1 + slen]
        offset += 1 + slen
        tlen, offset = _varint(data, offset)
        token = data[offset:offset + tlen]
        if len(dcid) != dlen or len(scid) != slen or len(token) != tlen or offset + tlen > len(data):
            return None
        return Initial(version, bytes(dcid), bytes(scid), bytes(token))
    except IndexError:
        return None


def has_token(data: bytes) -> bool:
    """True unless `data` is a long-header packet with an empty token field
    (the byte after the two CIDs); a short or odd datagram counts as having one."""
    try:
        dlen = data[5]
        return data[7 + dlen + data[6 + dlen]] != 0
    except IndexError:
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class Admit:
    """Build a connection. `retry_scid` is set when the address was validated."""

    original_dcid: bytes
    retry_scid: bytes | None = None


class Admission:
    """Budgets and Retry tokens of one listener worker (see the module doc)."""

    def __init__(self, *, key: bytes | None = None, now: float = 0.0, randbytes: Any = os.urandom) -> None:
        self._key = key or os.urandom(32)
        self._randbytes = randbytes
        self.new_total = TokenBucket(NEW_CONN_RATE, NEW_CONN_BURST, now)
        self.validated = TokenBucket(VALIDATED_CONN_RATE, VALIDATED_CONN_BURST, now)
        self.retries = TokenBucket(RETRY_RATE, RETRY_BURST, now)
        self.sources: dict[Any, TokenBucket] = {}
        #: Until then, Initials without a token are dropped unparsed (the
        #: tunnel checks this inline, before calling `decide`).
        self.closed_until = float("-inf")

    # ---- tokens ------------------------------------------------------------

    def _mac(self, addr: Any, body: bytes) -> bytes:
        who = f"{addr[0]}|{addr[1]}".encode()
        return hmac.new(self._key, who + b"\0" + body, hashlib.sha256).digest()[:_MAC_LEN]

    def make_token(self, addr: Any, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        """stamp(8) || len || original DCID || len || Retry SCID || MAC(16) over them and the address."""
        body = _STAMP.pack(now) + bytes([len(original_dcid)]) + original_dcid + bytes([len(retry_scid)]) + retry_scid
        return body + self._mac(addr, body)

    def check_token(self, token: bytes, addr: Any, dcid: bytes, now: float) -> Admit | None:
        """The CIDs of a token we made for `addr` within its lifetime whose Retry
        SCID is the Initial's DCID, else None."""
        if len(token) < _STAMP.size + 2 + _MAC_LEN:
            return None
        body, mac = token[:-_MAC_LEN], token[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        (stamp,) = _STAMP.unpack_from(body)
        if not (stamp <= now <= stamp + RETRY_TOKEN_LIFETIME):
            return None
        offset = _STAMP.size
        olen = body[offset]
        odcid = body[offset + 1:offset + 1 + olen]
        offset += 1 + olen
        if offset >= len(body):
            return None
        slen = body[offset]
        scid = body[offset + 1:offset + 1 + slen]
        if offset + 1 + slen != len(body) or scid != dcid:
            return None
        return Admit(bytes(odcid), bytes(scid))

    # ---- the gate ----------------------------------------------------------

    def _source(self, addr: Any, now: float) -> TokenBucket:
        bucket = self.sources.get(addr[0])
        if bucket is None:
            if len(self.sources) >= ADMISSION_SOURCES_MAX:
                del self.sources[next(iter(self.sources))]
            bucket = self.sources[addr[0]] = TokenBucket(NEW_CONN_PER_SOURCE_RATE, NEW_CONN_PER_SOURCE_BURST, now)
        return bucket

    def decide(self, data: bytes, addr: Any, now: float, *, room: bool) -> Admit | bytes | DropReason:
        """`Admit` (build a connection), bytes (send this Retry to `addr`) or
        the `DropReason` to count. `room`: the candidate table has a free slot."""
        if now < self.closed_until and not has_token(data):
            return DropReason.INITIAL_OVER_BUDGET
        initial = parse_initial(data)
        if initial is None:
            return DropReason.INITIAL_MALFORMED
        if initial.token:
            admit = self.check_token(initial.token, addr, initial.dcid, now)
            if admit is None:
                return DropReason.INITIAL_BAD_TOKEN
            return admit if self.validated.take(now) else DropReason.INITIAL_OVER_BUDGET
        if room and self.new_total.ready(now) and self._source(addr, now).take(now):
            self.new_total.take(now)
            return Admit(initial.dcid)
        if not self.retries.take(now):
            retries = self.retries
            self.closed_until = now + (1.0 - retries.tokens) / retries.rate
            return DropReason.INITIAL_OVER_BUDGET
        return self.retry_packet(initial, addr, now)

    def retry_packet(self, initial: Initial, addr: Any, now: float) -> bytes:
        from aioquic.quic.packet import encode_quic_retry  # wire format only; both engines read it

        scid = self._randbytes(_RETRY_CID_LEN)
        token = self.make_token(addr, initial.dcid, scid, now)
        return encode_quic_retry(version=initial.version, source_cid=scid, destination_cid=initial.scid,
                                 original_destination_cid=initial.dcid, retry_token=token)
