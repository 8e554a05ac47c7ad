"""The REALITY gate of a listener (issue 15), sans I/O: which datagrams of which senders reach l3ptp's QUIC.

The listener's shell gives the gate every datagram from a sender it has no
session, candidate or relay flow for. The gate reads the sender's Initials
(worker/initial.py) until the ClientHello is complete, buffering what it read
within bounds, then decides once per sender:

* `PASS`: the ClientHello carries our REALITY seal (worker/reality.py): the
  buffered datagrams go to the QUIC engine, which answers as l3ptp;
* `RELAY`: anything else, when a camouflage target is configured: the sender
  becomes a relay flow (`RelayTable`) and its buffered datagrams, and all it
  sends later, go to the target, whose answers go back to it;
* `DROP`: the same without a target: no answer at all.

`PENDING` means "buffered, nothing to send yet". Every refusal carries its
reason (a `Verdict` value or one of the gate's own), which the shell counts.
Nothing here grows without a bound: pending senders, their bytes and their
lifetime, relay flows, their rate and their idle time all have limits, and
a full table refuses (counted) instead of evicting a flow mid-handshake.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable

from . import initial as qi
from . import reality

__all__ = ["Action", "Decision", "RealityGate", "RelayFlow", "RelayTable"]

#: Senders whose ClientHello is still coming in.
MAX_PENDING = 256
#: How long a sender may take to complete its ClientHello.
PENDING_TIMEOUT = 2.0
#: Datagrams buffered per pending sender (a ClientHello spans 1-3 Initials; clients retransmit).
MAX_PENDING_DATAGRAMS = 8
#: New senders examined per second (a token bucket with one second of burst). Each costs the Initial's key
#: derivation, its decryption and one X25519 (about 0.13 ms of CPU in all); past the budget a new sender
#: is refused unexamined ("over_budget": relayed or dropped like any refusal), so that a flood of
#: senders costs at most this many examinations a second (docs/threat-model.md).
NEW_SENDER_RATE = 1000
#: Relay flows at once (one socket each: well inside the default 1024 open files); idle this long: closed.
MAX_RELAY_FLOWS = 256
RELAY_IDLE = 30.0
#: Bytes per second per relay flow and direction (a token bucket with one second of burst).
RELAY_RATE = 4_000_000


class Action(enum.Enum):
    PASS = "pass"
    RELAY = "relay"
    DROP = "drop"
    PENDING = "pending"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    datagrams: tuple[bytes, ...] = ()
    reason: str | None = None  # why not PASS: a reality.Verdict value or the gate's own


@dataclasses.dataclass(slots=True)
class _Pending:
    since: float
    dcid: bytes
    assembler: qi.CryptoAssembler
    datagrams: list[bytes]


class RealityGate:
    def __init__(self, credential: reality.Credential, *, camouflage: bool, clock_skew: float = reality.MAX_SKEW,
                 max_pending: int = MAX_PENDING, pending_timeout: float = PENDING_TIMEOUT,
                 new_sender_rate: int = NEW_SENDER_RATE) -> None:
        self.credential, self.camouflage = credential, camouflage
        self.max_skew, self.max_pending, self.pending_timeout = clock_skew, max_pending, pending_timeout
        self.rate, self._tokens, self._tokens_at = new_sender_rate, float(new_sender_rate), None
        self.replay = reality.ReplayCache(window=clock_skew)
        self._pending: dict[Hashable, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _refuse(self, reason: str, datagrams: tuple[bytes, ...]) -> Decision:
        return Decision(Action.RELAY if self.camouflage else Action.DROP, datagrams, reason)

    def datagram(self, sender: Hashable, data: bytes, now: float, wall_time: float) -> Decision:
        """One datagram of a sender with no session or flow; `now` monotonic, `wall_time` unix (the seal's)."""
        p = self._pending.get(sender)
        if p is not None and now - p.since > self.pending_timeout:
            del self._pending[sender]
            return self._refuse("pending_timeout", (*p.datagrams, data))
        try:
            header = qi.parse_initial_header(data)
        except qi.InitialError:
            if p is not None:
                del self._pending[sender]
                return self._refuse("not_initial", (*p.datagrams, data))
            return self._refuse("not_initial", (data,))
        if p is None:
            if len(self._pending) >= self.max_pending:
                return self._refuse("pending_full", (data,))
            if not self._take_token(now):
                return self._refuse("over_budget", (data,))
            p = self._pending[sender] = _Pending(now, header.dcid, qi.CryptoAssembler(), [])
        elif header.dcid != p.dcid or len(p.datagrams) >= MAX_PENDING_DATAGRAMS:
            del self._pending[sender]
            return self._refuse("pending_mismatch" if header.dcid != p.dcid else "pending_datagrams",
                                (*p.datagrams, data))
        p.datagrams.append(data)
        try:
            _, payload = qi.decrypt_initial(data, header)
            for offset, chunk in qi.crypto_frames(payload):
                p.assembler.add(offset, chunk)
            message = p.assembler.client_hello()
            if message is None:
                return Decision(Action.PENDING)
            hello = qi.parse_client_hello(message)
            verdict = reality.open_random(self.credential, hello.random, hello.without_random(), hello.key_shares,
                                          wall_time, self.replay, self.max_skew)
        except qi.InitialError:
            verdict = None
        del self._pending[sender]
        if verdict is reality.Verdict.OK:
            return Decision(Action.PASS, tuple(p.datagrams))
        return self._refuse("bad_initial" if verdict is None else verdict.value, tuple(p.datagrams))

    def _take_token(self, now: float) -> bool:
        """One new sender's examination from the budget (NEW_SENDER_RATE a second, a second of burst)."""
        if self._tokens_at is not None:
            self._tokens = min(float(self.rate), self._tokens + (now - self._tokens_at) * self.rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def expire(self, now: float) -> list[tuple[Hashable, Decision]]:
        """Senders that did not complete their ClientHello in time, with what to do with what they sent."""
        late = [s for s, p in self._pending.items() if now - p.since > self.pending_timeout]
        return [(s, self._refuse("pending_timeout", tuple(self._pending.pop(s).datagrams))) for s in late]


@dataclasses.dataclass(slots=True)
class RelayFlow:
    """One unauthenticated sender relayed to the camouflage target."""

    created: float
    last: float
    tokens_up: float
    tokens_down: float
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0  # over the rate


class RelayTable:
    """The relay flows of one listener (the shell holds each flow's upstream socket by the same key)."""

    def __init__(self, *, max_flows: int = MAX_RELAY_FLOWS, idle: float = RELAY_IDLE, rate: int = RELAY_RATE) -> None:
        self.max_flows, self.idle, self.rate = max_flows, idle, rate
        self.flows: dict[Hashable, RelayFlow] = {}

    def __contains__(self, sender: Hashable) -> bool:
        return sender in self.flows

    def open(self, sender: Hashable, now: float) -> bool:
        """A new flow for `sender`; False when the table is full (the caller drops and counts)."""
        if sender in self.flows:
            return True
        if len(self.flows) >= self.max_flows:
            return False
        self.flows[sender] = RelayFlow(now, now, float(self.rate), float(self.rate))
        return True

    def _allow(self, flow: RelayFlow, size: int, now: float, up: bool) -> bool:
        elapsed = max(0.0, now - flow.last)
        flow.tokens_up = min(float(self.rate), flow.tokens_up + elapsed * self.rate)
        flow.tokens_down = min(float(self.rate), flow.tokens_down + elapsed * self.rate)
        flow.last = now
        tokens = flow.tokens_up if up else flow.tokens_down
        if size > tokens:
            flow.dropped += 1
            return False
        if up:
            flow.tokens_up -= size
            flow.bytes_up += size
        else:
            flow.tokens_down -= size
            flow.bytes_down += size
        return True

    def upstream(self, sender: Hashable, size: int, now: float) -> bool:
        """May `size` bytes from the sender go to the target now?"""
        flow = self.flows.get(sender)
        return flow is not None and self._allow(flow, size, now, True)

    def downstream(self, sender: Hashable, size: int, now: float) -> bool:
        """May `size` bytes from the target go back to the sender now?"""
        flow = self.flows.get(sender)
        return flow is not None and self._allow(flow, size, now, False)

    def expire(self, now: float) -> list[Hashable]:
        """Flows idle for `idle` seconds: removed here; the caller closes their sockets."""
        gone = [s for s, f in self.flows.items() if now - f.last > self.idle]
        for s in gone:
            del self.flows[s]
        return gone
