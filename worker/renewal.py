"""Renewal: the running session moves to a fresh connection without a gap (make-before-break).

A reload that changes this node's key, the keys pinned for the peer or what the peer may send from is
applied to the running worker (`Renewal.rekey`, from the controller's bus message `Rekey`); nothing is
restarted. New handshakes use the new keys at once. The active session is renewed when it no longer
matches them: our key changed, or the key the peer proved is no longer pinned (docs/protocol.md,
"Renewal"):

* Connector: it starts a *successor*, a second connection to the same peer from the same socket, while
  the active one keeps carrying traffic. When the successor's session is ESTABLISHED it becomes the
  active one (`connections._on_established`). A successor that fails (the peer does not pin our new key
  yet, say) is counted (`renew_failures`) and tried again after RENEW_RETRY s while the renewal is still
  wanted; the active session goes on meanwhile.
* Listener: it cannot open a connection. It sends RENEW on the control stream to a connector whose HELLO
  listed the feature "renew", and the connector renews; a new connection from the peer that becomes
  ESTABLISHED replaces the active one the same way.

The replaced connection *retires*: for RETIRE_DRAIN s its DATAGRAMs (in flight when the peer switched)
still reach the TUN, then it is closed with CLOSE(SHUTDOWN). While two connections share the peer's
address, a datagram goes to the one its destination connection ID names.

An active session whose peer key is no longer pinned (removed, or past its not-after time) carries
traffic for at most RENEW_GRACE s more: then it is closed unless a renewal replaced it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import structlog

from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.types import PeerRole

from . import keys
from .connections import Peer, pinned_now
from .ippacket import PrefixSet
from .session import State

if TYPE_CHECKING:
    from .tunnel import Tunnel

__all__ = ["RENEW_GRACE", "RENEW_RETRY", "RETIRE_DRAIN", "Renewal"]

#: Seconds a replaced connection still delivers what arrives on it before it is closed.
RETIRE_DRAIN = 2.0
#: Seconds an active session whose peer key is no longer pinned may still carry traffic.
RENEW_GRACE = 10.0
#: Connector: seconds between the starts of two successors (a failed one is tried again after this; a
#: peer asking again and again with RENEW gets one handshake per RENEW_RETRY at most).
RENEW_RETRY = 5.0

log = structlog.get_logger("l3ptp.worker")


class Renewal:
    """Renewal state and steps; a base of `Tunnel`, whose attributes it uses."""

    def _init_renewal(self: Tunnel) -> None:
        #: Connector: the connection that is to replace the active one (None: no renewal running).
        self.successor: Peer | None = None
        #: Replaced connections, still delivering until their deadline.
        self.retiring: dict[Peer, float] = {}
        #: Two or more connections may share the peer's address: route by connection ID first.
        self.multi = False
        self.renewals = 0  #: established sessions replaced by a new one without a gap
        self.renew_failures = 0  #: connector: successors that did not reach ESTABLISHED
        self.renew_wanted = ""  #: why a renewal is wanted ("": none)
        self._renew_at: float | None = None  #: connector: next attempt
        self._renew_started = float("-inf")  #: connector: when the last successor started
        #: A switch happened: does the new session match the keys (they may have changed meanwhile)?
        self._recheck = False
        self._unpinned_at: float | None = None  #: the active session is closed then, unless replaced

    # ---- inputs --------------------------------------------------------

    def rekey(self: Tunnel, *, private_key: bytes, peer_key: str, peer_keys: tuple[str, ...],
              peer_keys_not_after: tuple[float, ...], peer_sources: tuple[str, ...]) -> None:
        """A reload changed our key, the pinned peer keys or the peer's allowed sources: from now on new
        handshakes use them; the active session is renewed if it no longer matches them."""
        own_changed = private_key != self.config.private_key
        self.config = dataclasses.replace(self.config, private_key=private_key, peer_key=peer_key,
                                          peer_keys=peer_keys, peer_keys_not_after=peer_keys_not_after,
                                          peer_sources=peer_sources)
        if own_changed:
            self._key = keys.private_key_from_raw(private_key)
            self._cert = keys.self_signed_certificate(self._key) if self.config.role is PeerRole.LISTEN else None
            self._configs.clear()  # built again, with the new certificate, for the next connection
        self.params = dataclasses.replace(self.params, private_key=private_key, peer_key=peer_key)
        self.datapath.peer_sources = PrefixSet(peer_sources)
        log.info("rekeyed", own_key_changed=own_changed, pinned=len(pinned_now(self.config, time.time())),
                 peer_sources=len(peer_sources))
        if self._loop is not None:
            self._check_session(self._now(), "", again=True)
            self._schedule()

    def _check_session(self: Tunnel, now: float, why: str, *, again: bool = False) -> None:
        """Does the active session still match the keys? Renew it if not (`why`: a reason already known),
        unless a renewal is wanted already (`again`: then too)."""
        active = self.active
        if active is None or not active.session.established:
            return
        if active.session.params.private_key != self.config.private_key:
            why = why or "our key changed"
        if active.session.peer_fingerprint not in pinned_now(self.config, time.time()):
            why = why or "the peer's key is no longer pinned"
            if self._unpinned_at is None:
                self._unpinned_at = now + RENEW_GRACE
                log.warning("peer_key_unpinned", key=active.session.peer_fingerprint, grace=RENEW_GRACE)
        if why and (again or not self.renew_wanted):
            self.renew(now, why)

    def renew(self: Tunnel, now: float, why: str) -> None:
        """Move the session to a new connection: start a successor (connector) or ask the peer (listener)."""
        active = self.active
        if active is None or not active.session.established or self._stop_requested:
            return
        self.renew_wanted = why
        if self.config.role is PeerRole.LISTEN:
            self._apply(active, active.session.request_renewal(why))
            self._transmit(active)
            return
        if self.successor is not None or self._peer_addr is None:
            return
        if now < self._renew_started + RENEW_RETRY:  # bounded, whoever asks
            self._renew_at = self._renew_started + RENEW_RETRY
            return
        self._renew_started = now
        policy = dataclasses.replace(self.core.connecting(now), expires=now + self.core.candidate_lifetime)
        peer = self.successor = self._client_peer(now, policy)
        self._renew_at = None
        self.multi = True
        log.info("renewal_started", why=why)
        self._transmit(peer)

    # ---- steps the connection bookkeeping calls ----------------------------

    def _switching(self: Tunnel, old: Peer, new: Peer) -> bool:
        """`new` is ESTABLISHED and replaces `old`: retire `old` (True) if it carried traffic, else False
        (the caller closes it)."""
        if not old.session.established:
            return False
        old.policy.expires = float("inf")  # its end is RETIRE_DRAIN, not a candidate's lifetime
        self.retiring[old] = self._now() + RETIRE_DRAIN
        while len(self.retiring) > 4:  # bounded: the oldest goes at once
            self._end_retired(next(iter(self.retiring)))
        if new is self.successor:
            self.successor = None
        self.renewals += 1
        self.renew_wanted, self._renew_at, self._unpinned_at = "", None, None
        self.multi = self._recheck = True  # a reload during the handshake may have changed the keys again
        log.info("session_renewed", old=f"{old.addr[0]}:{old.addr[1]}", new=f"{new.addr[0]}:{new.addr[1]}",
                 renewals=self.renewals)
        return True

    def _forget(self: Tunnel, peer: Peer, reason: str) -> None:
        """`peer` is gone: it may have been the successor or a retiring connection."""
        self.retiring.pop(peer, None)
        if peer is self.successor:
            self.successor = None
            self.renew_failures += 1
            self.last_error = f"renewal failed: {reason}"[:500]
            log.warning("renewal_failed", reason=reason[:200])
            if self.renew_wanted and not self._stop_requested:
                self._renew_at = self._renew_started + RENEW_RETRY
        if not self.retiring:
            self.datapath.rx_previous = -1
        self.multi = self.successor is not None or bool(self.retiring) or (
            self.active is not None and self.active.addr in self.candidates)

    def _end_retired(self: Tunnel, peer: Peer) -> None:
        """A retiring connection's time is up (or too many retire): CLOSE(SHUTDOWN) and gone."""
        self.retiring.pop(peer, None)
        self._apply(peer, peer.session.close(ErrorCode.SHUTDOWN, "replaced by a new session"))
        self._forget(peer, "retired")

    def _by_cid(self: Tunnel, data: bytes) -> Peer | None:
        """The connection whose connection IDs include `data`'s destination CID (None: none of ours). A
        candidate still in its handshake is left to `_route`'s checks (its datagram budget)."""
        if len(data) < 7:
            return None
        peers = [*self.retiring, *(c for c in self.candidates.values() if c.handshake_done)]
        if self.successor is not None:
            peers.append(self.successor)
        if self.active is not None:
            peers.append(self.active)
        long_header = data[0] & 0x80
        dcid = bytes(data[6:6 + data[5]]) if long_header else b""
        for peer in peers:
            cid = dcid if long_header else bytes(data[1:1 + len(peer.conn.host_cid)])
            if cid in peer.cids:
                return peer
        return None

    def _renewal_peers(self: Tunnel) -> list[Peer]:
        peers = list(self.retiring)
        if self.successor is not None:
            peers.append(self.successor)
        return peers

    # ---- time ----------------------------------------------------------

    def _renewal_deadlines(self: Tunnel) -> list[float]:
        out = list(self.retiring.values()) + ([0.0] if self._recheck else [])
        for t in (self._renew_at, self._unpinned_at):
            if t is not None:
                out.append(t)
        return out

    def _renewal_timer(self: Tunnel, now: float) -> None:
        for peer, t in list(self.retiring.items()):
            if now >= t:
                self._end_retired(peer)
        if self._renew_at is not None and now >= self._renew_at:
            self._renew_at = None
            self.renew(now, self.renew_wanted or "retry")
        if self._recheck:
            self._recheck = False
            self._check_session(now, "", again=True)
        elif any(self.config.peer_keys_not_after):  # a pinned key may have just passed its not-after time
            self._check_session(now, "")
        active = self.active
        if self._unpinned_at is not None and now >= self._unpinned_at:
            self._unpinned_at = None
            if active is not None and active.session.state is not State.CLOSED and \
                    active.session.peer_fingerprint not in pinned_now(self.config, time.time()):
                self._apply(active, active.session.close(ErrorCode.AUTH_FAILED, "the peer's key is no longer pinned"))

    def renewal_counters(self: Tunnel) -> dict[str, int]:
        return {"renewals": self.renewals, "renew_failures": self.renew_failures}
