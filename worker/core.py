"""The tunnel's sans-I/O core: the policy decisions of one worker's peer link.

`TunnelCore` holds the policy state of the link (reconnect backoff, hint timers, key updates started)
and creates one `PeerPolicy` per QUIC connection (candidate lifetime and datagram gate, key-update
schedule, liveness probe). Every method takes `now` as an argument: the core never reads a clock,
does no I/O and draws randomness only from the callable it is given. It answers with decisions
(booleans, deadlines, the PING to send); `worker/tunnel.py`, the I/O shell, reads the clock, calls
the core and carries them out. Small pure functions it uses live in `worker/policy.py`.

Decisions:

* Candidates (listener): `room` (at most `max_candidates` at once, a known address replaces its
  own), `evict` (the oldest, for an address-validated attempt when the table is full), `admitted`
  (each lives at most `candidate_lifetime` s, `candidate_expired`), `candidate_datagram` (the gate
  before the handshake completes).
* Reconnect (connector): `session_ended` schedules the next attempt after an exponential backoff
  with jitter (RECONNECT_BACKOFF_MIN doubling up to RECONNECT_BACKOFF_MAX, times 0.5 to 1);
  `established` resets it; a failed liveness probe reconnects at once (`reconnect_now`).
* Key updates: after `key_update_packets` DATAGRAMs sent + received under a key, or
  `key_update_interval` s after it, whichever comes first (`key_update_due`); a refused update is
  retried within min(1 s, interval) (`key_updated`).
* Liveness probe (connector): `probe`, `ping_acked`, `probe_expired`.
* Restart hints (listener): `restart_hint` (at most one per HINT_EVERY s), `start_hints` /
  `start_hint` / `start_hint_due` (START_HINTS at start, HINT_EVERY s apart).
* Timers: `deadlines` lists the core's own deadlines for the shell's one timer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TypeVar

from l3ptp.ipc.constants import (
    CANDIDATE_LIFETIME,
    KEY_UPDATE_INTERVAL,
    KEY_UPDATE_PACKETS,
    MAX_CANDIDATES,
    RECONNECT_BACKOFF_MIN,
)

from . import policy
from .policy import HINT_EVERY, START_HINTS

__all__ = ["PeerPolicy", "TunnelCore"]

K = TypeVar("K")


@dataclasses.dataclass(slots=True)
class PeerPolicy:
    """The policy state of one QUIC connection."""

    #: When the connection attempt started (connect, or the listener admitting it).
    started_at: float
    #: A listener's candidate not ESTABLISHED by then is dropped.
    expires: float = float("inf")
    #: Datagrams routed to this connection before its handshake completed.
    datagrams: int = 0
    #: Next key update: when DATAGRAMs sent + received reach this, or at this time. None is due before
    #: the session is ESTABLISHED (`TunnelCore.established` schedules the first): asking the engine
    #: during the handshake only fails, once per received batch.
    rekey_packets: int = 2**63
    rekey_at: float = float("inf")
    #: Liveness probe: its deadline (None: none running) and the PINGs sent so far.
    probe_at: float | None = None
    probes: int = 0


class TunnelCore:
    """Policy state and decisions of one worker's peer link. See the module docstring."""

    def __init__(
        self,
        *,
        random: Callable[[], float],
        key_update_packets: int = KEY_UPDATE_PACKETS,
        key_update_interval: float = KEY_UPDATE_INTERVAL,
        max_candidates: int | None = None,
        candidate_lifetime: float | None = None,
    ) -> None:
        self._random = random
        self.key_update_packets = key_update_packets
        self.key_update_interval = key_update_interval
        #: None: MAX_CANDIDATES and CANDIDATE_LIFETIME, read when the core is made.
        self.max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
        self.candidate_lifetime = CANDIDATE_LIFETIME if candidate_lifetime is None else candidate_lifetime
        #: QUIC key updates this worker started (RFC 9001, 6).
        self.key_updates = 0
        #: The backoff the next `session_ended` draws its delay from.
        self.backoff = RECONNECT_BACKOFF_MIN
        #: When the connector starts its next connection attempt (None: none scheduled).
        self.reconnect_at: float | None = None
        #: Listener: no RESTART_HINT before this.
        self.hint_at = 0.0
        #: Listener: when to send the next start hint, and how many are left.
        self.start_hint_at = 0.0
        self.start_hints_left = 0

    # ---- connections ----------------------------------------------------

    def connecting(self, now: float) -> PeerPolicy:
        """The connector starts a connection attempt."""
        self.reconnect_at = None
        return PeerPolicy(started_at=now)

    def room(self, count: int, known: bool) -> bool:
        """Whether a new candidate fits among `count` (`known`: one for its address exists)."""
        return policy.candidate_room(count, known, self.max_candidates)

    def evict(self, candidates: Iterable[K]) -> K:
        """Which candidate an address-validated attempt evicts from a full table."""
        return policy.eviction_victim(candidates)

    def admitted(self, now: float) -> PeerPolicy:
        """The listener admits a candidate: a connection attempt came, so the start hints stop."""
        self.start_hints_left = 0
        return PeerPolicy(started_at=now, expires=now + self.candidate_lifetime)

    def candidate_datagram(self, peer: PeerPolicy, data: bytes, cids: tuple[bytes, ...]) -> bool:
        """A datagram for a candidate whose handshake has not completed: whether it reaches the engine."""
        peer.datagrams += 1
        return policy.candidate_accepts(peer.datagrams, data, cids)

    @staticmethod
    def candidate_expired(peer: PeerPolicy, now: float) -> bool:
        return peer.expires <= now

    def established(self, peer: PeerPolicy, now: float, packets: int) -> None:
        """A session is ESTABLISHED: the backoff starts over, the key-update schedule starts."""
        self.backoff = RECONNECT_BACKOFF_MIN
        self.schedule_key_update(peer, now, packets)

    # ---- reconnect ------------------------------------------------------

    def session_ended(self, now: float) -> float:
        """The connector's session ended: when to reconnect (after the backoff, which grows)."""
        delay, self.backoff = policy.reconnect_delay(self.backoff, self._random())
        self.reconnect_at = now + delay
        return self.reconnect_at

    def reconnect_now(self, now: float) -> None:
        """Reconnect at once, from the shortest backoff (the peer's new worker is listening by now)."""
        self.reconnect_at = now
        self.backoff = RECONNECT_BACKOFF_MIN

    def resolving(self) -> None:
        """The shell resolves the peer's name before it reconnects: no reconnect is due meanwhile."""
        self.reconnect_at = None

    def reconnect_due(self, now: float) -> bool:
        return self.reconnect_at is not None and now >= self.reconnect_at

    def stop(self) -> None:
        self.reconnect_at = None

    # ---- key updates ----------------------------------------------------

    def schedule_key_update(self, peer: PeerPolicy, now: float, packets: int) -> None:
        """The next key update: `key_update_packets` DATAGRAMs after `packets`, or `key_update_interval` s on."""
        peer.rekey_packets = packets + self.key_update_packets
        peer.rekey_at = now + self.key_update_interval

    @staticmethod
    def key_update_due(peer: PeerPolicy, now: float, packets: int) -> bool:
        """By packets or by time (the timer's check)."""
        return policy.key_update_due(now, packets, peer.rekey_at, peer.rekey_packets)

    @staticmethod
    def key_update_due_by_packets(peer: PeerPolicy, packets: int) -> bool:
        """By packets only (the check after each UDP and TUN batch)."""
        return packets >= peer.rekey_packets

    def key_updated(self, peer: PeerPolicy, now: float, packets: int, ok: bool) -> None:
        """The shell asked the engine for a key update; `ok`: it started one."""
        if ok:
            self.key_updates += 1
            self.schedule_key_update(peer, now, packets)
        else:
            # Not acknowledged yet: try again soon (a deadline in the past would spin the timer).
            peer.rekey_at = now + min(1.0, self.key_update_interval)

    # ---- liveness probe -------------------------------------------------

    @staticmethod
    def probe(peer: PeerPolicy, now: float, why: str, smoothed_rtt: float) -> tuple[bool, int | None]:
        """An ICMP error (`why` "icmp") or a RESTART_HINT ("hint") for the active, ESTABLISHED session:
        (whether the probe deadline changed, the PING uid to send or None). A further ICMP error moves
        a running probe's deadline; a hint does not."""
        if peer.probe_at is not None and why != "icmp":
            return False, None
        ping = None
        if peer.probe_at is None:
            peer.probes += 1
            ping = peer.probes
        peer.probe_at = policy.probe_deadline(now, smoothed_rtt)
        return True, ping

    @staticmethod
    def ping_acked(peer: PeerPolicy, uid: int) -> None:
        if uid == peer.probes:
            peer.probe_at = None  # alive: the ICMP error was stale or forged

    @staticmethod
    def probe_expired(peer: PeerPolicy, now: float) -> bool:
        """The running probe's PING went unanswered by its deadline (the probe ends)."""
        if peer.probe_at is not None and now >= peer.probe_at:
            peer.probe_at = None
            return True
        return False

    # ---- restart hints --------------------------------------------------

    def restart_hint(self, now: float) -> bool:
        """Whether a RESTART_HINT may go out now (at most one per HINT_EVERY s)."""
        if now >= self.hint_at:
            self.hint_at = now + HINT_EVERY
            return True
        return False

    def start_hints(self) -> None:
        self.start_hints_left = START_HINTS

    def start_hint(self, now: float) -> bool:
        """Whether to send a start hint now (one fewer left, the next HINT_EVERY s later)."""
        if self.start_hints_left <= 0:
            return False
        self.start_hints_left -= 1
        self.start_hint_at = now + HINT_EVERY
        return True

    def start_hint_due(self, now: float) -> bool:
        return self.start_hints_left > 0 and now >= self.start_hint_at

    # ---- timers ---------------------------------------------------------

    def deadlines(self, active: PeerPolicy | None, established: bool, candidates: Iterable[PeerPolicy]) -> list[float]:
        """The core's own deadlines: candidate lifetimes, the active session's key update and probe,
        the reconnect, the next start hint."""
        deadlines = [peer.expires for peer in candidates]
        if active is not None and established:
            deadlines.append(active.rekey_at)
            if active.probe_at is not None:
                deadlines.append(active.probe_at)
        if self.reconnect_at is not None:
            deadlines.append(self.reconnect_at)
        if self.start_hints_left > 0:
            deadlines.append(self.start_hint_at)
        return deadlines
