"""What the helper owns: networks, their queue fds (as ints), and tickets. Pure.

Ownership is the whole security story: the helper only ever touches links
and routes recorded here (plus, at reconcile, leftovers carrying its prefix
and route protocol). Tickets are single use, bound to one worker uid, and
expire `ticket_ttl` seconds after issue; time is always passed in as `now`.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

from l3ptp.ipc.constants import TICKET_BYTES, TICKET_TTL
from l3ptp.ipc.errors import ErrorCode

from .validate import Refused


@dataclasses.dataclass(slots=True, kw_only=True)
class Network:
    name: str
    ifname: str
    ifindex: int
    mtu: int
    addresses: tuple[str, ...]
    queues: int
    worker_uid: int
    fds: list[int]
    routes: dict[str, int] = dataclasses.field(default_factory=dict)  # prefix -> metric

    def spec(self) -> tuple[object, ...]:
        return (self.ifname, self.mtu, tuple(sorted(self.addresses)), self.queues, self.worker_uid)


@dataclasses.dataclass(frozen=True, slots=True)
class TicketEntry:
    network: str
    queue: int
    uid: int
    expires: float


def new_token() -> str:
    return secrets.token_urlsafe(TICKET_BYTES)


class State:
    def __init__(self, *, ticket_ttl: float = TICKET_TTL, token: Callable[[], str] = new_token) -> None:
        self.networks: dict[str, Network] = {}
        self.tickets: dict[str, TicketEntry] = {}
        self.ticket_ttl = ticket_ttl
        self._token = token

    def by_ifname(self, ifname: str) -> Network | None:
        return next((n for n in self.networks.values() if n.ifname == ifname), None)

    def add(self, net: Network) -> None:
        assert net.name not in self.networks
        self.networks[net.name] = net

    def forget(self, name: str) -> Network:
        """Drop a network and every ticket for it."""
        self.revoke(name)
        return self.networks.pop(name)

    def revoke(self, name: str) -> None:
        for token in [t for t, e in self.tickets.items() if e.network == name]:
            del self.tickets[token]

    def issue(self, net: Network, now: float) -> tuple[str, ...]:
        """One fresh ticket per queue; older unclaimed tickets of `net` stop working."""
        self.revoke(net.name)
        out = []
        for queue in range(net.queues):
            token = self._token()
            assert token not in self.tickets
            self.tickets[token] = TicketEntry(net.name, queue, net.worker_uid, now + self.ticket_ttl)
            out.append(token)
        return tuple(out)

    def expire(self, now: float) -> None:
        for token in [t for t, e in self.tickets.items() if e.expires <= now]:
            del self.tickets[token]

    def claim(self, token: str, uid: int, now: float) -> tuple[Network, int]:
        """Consume a ticket. A wrong uid does not consume it (it is still the worker's)."""
        self.expire(now - self.ticket_ttl)  # keep recently expired ones to say EXPIRED
        entry = self.tickets.get(token)
        if entry is None:
            raise Refused(ErrorCode.NOT_FOUND, "unknown or already used ticket")
        if entry.expires <= now:
            del self.tickets[token]
            raise Refused(ErrorCode.EXPIRED, "ticket expired")
        if entry.uid != uid:
            raise Refused(ErrorCode.NOT_PERMITTED, "ticket is bound to another uid")
        del self.tickets[token]
        return self.networks[entry.network], entry.queue
