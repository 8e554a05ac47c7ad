"""Small pure policy functions of the tunnel: no I/O, no clock, no random source of their own.

`worker/core.py` (`TunnelCore`) holds the state these decide on; `worker/tunnel.py` (the I/O shell)
reads the clock and passes `now` in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TypeVar

from l3ptp.ipc.constants import CANDIDATE_DATAGRAMS_MAX, RECONNECT_BACKOFF_MAX

__all__ = [
    "HINT_EVERY",
    "PROBE_TIMEOUT",
    "RESTART_HINT",
    "START_HINTS",
    "candidate_accepts",
    "candidate_room",
    "eviction_victim",
    "key_update_due",
    "looks_like_initial",
    "normalize_ip",
    "probe_deadline",
    "reconnect_delay",
]

#: Seconds a liveness probe waits for its PING's ACK after the last ICMP error (plus 3 RTTs).
PROBE_TIMEOUT = 0.15
#: "Unknown connection" hint a listener sends back for a short-header packet it has no connection for
#: (a restarted worker): shaped as a QUIC Version Negotiation packet with no CIDs, which no QUIC stack
#: accepts after the handshake; the connector answers it with a liveness probe. At most one per HINT_EVERY s.
RESTART_HINT = bytes([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])  # version 0, no DCID/SCID, "supports" QUIC v1
HINT_EVERY = 0.1
#: RESTART_HINTs a new listener sends at start to the peer its predecessor last reported
#: (`WorkerConfig.last_peer`), HINT_EVERY s apart, until a connection attempt arrives.
START_HINTS = 3
_MIN_INITIAL = 1200

K = TypeVar("K")


def reconnect_delay(backoff: float, random: float) -> tuple[float, float]:
    """The delay before the next connection attempt for the current `backoff` and a `random` number
    in [0, 1) (jitter: half to all of it), and the backoff after it (doubled, at most RECONNECT_BACKOFF_MAX)."""
    return backoff * (0.5 + random / 2), min(backoff * 2, RECONNECT_BACKOFF_MAX)


def key_update_due(now: float, packets: int, rekey_at: float, rekey_packets: int) -> bool:
    """A key update is due once the DATAGRAMs under the key reach `rekey_packets` or at `rekey_at`."""
    return now >= rekey_at or packets >= rekey_packets


def candidate_room(count: int, known: bool, limit: int) -> bool:
    """A new candidate fits: fewer than `limit` exist, or one for this address does (it is replaced)."""
    return count < limit or known


def eviction_victim(candidates: Iterable[K]) -> K:
    """The candidate an address-validated attempt evicts when the table is full: the oldest."""
    return next(iter(candidates))


def candidate_accepts(datagrams: int, data: bytes, cids: tuple[bytes, ...]) -> bool:
    """Whether a candidate whose handshake has not completed takes its `datagrams`-th datagram: junk sent to
    a candidate's address costs the engine new initial keys and a failed decryption each (a millisecond), so
    only Initials to this handshake's CIDs, and only as many datagrams as a handshake needs, reach it."""
    return not (datagrams > CANDIDATE_DATAGRAMS_MAX or (
        data and (data[0] & 0xF0) == 0xC0 and (len(data) < 7 or data[6:6 + data[5]] not in cids)))


def looks_like_initial(data: bytes) -> bool:
    # Long header (0x80) with the fixed bit (0x40) and type Initial (0b00).
    return len(data) >= _MIN_INITIAL and (data[0] & 0xF0) == 0xC0


def probe_deadline(now: float, smoothed_rtt: float) -> float:
    """When a liveness probe started or moved at `now` fails unless its PING is acknowledged."""
    return now + PROBE_TIMEOUT + 3 * smoothed_rtt


def normalize_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the kernel reports it, with IPv4-mapped IPv6 unmapped."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
