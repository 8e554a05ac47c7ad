"""What the helper owns: networks, their queue fds (as ints), and tickets. Pure.

Tickets are single use, bound to one worker uid and expire `ticket_ttl` seconds after issue (`now` is passed in).
"""

import dataclasses
import ipaddress
import secrets
from collections.abc import Callable
from typing import NamedTuple

from l3ptp.ipc.constants import TICKET_BYTES, TICKET_TTL
from l3ptp.ipc.errors import ErrorCode

from .policy import PolicyRefused


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
    detached: set[int] = dataclasses.field(default_factory=set)  # adopted queues not yet handed out

    def spec(self) -> tuple[object, ...]:
        return (self.ifname, self.mtu, tuple(sorted(self.addresses)), self.queues, self.worker_uid)

    def guarded(self) -> set[str]:  # what its kill switch covers: its routes and its addresses' networks
        return {*self.routes, *(str(ipaddress.ip_interface(a).network) for a in self.addresses)}


class TicketEntry(NamedTuple):
    network: str
    queue: int
    uid: int
    expires: float


class HelperState:
    def __init__(self, *, ticket_ttl: float = TICKET_TTL,
                 token: Callable[[], str] = lambda: secrets.token_urlsafe(TICKET_BYTES)) -> None:
        self.networks: dict[str, Network] = {}
        self.tickets: dict[str, TicketEntry] = {}
        self.ticket_ttl, self._token = ticket_ttl, token

    def by_ifname(self, ifname: str) -> Network | None:
        return next((n for n in self.networks.values() if n.ifname == ifname), None)

    def add(self, net: Network) -> None:
        assert net.name not in self.networks
        self.networks[net.name] = net

    def _drop_tickets(self, keep: Callable[[TicketEntry], bool]) -> None:
        self.tickets = {t: e for t, e in self.tickets.items() if keep(e)}

    def forget(self, name: str) -> Network:
        """Drop a network and every ticket for it."""
        self._drop_tickets(lambda e: e.network != name)
        return self.networks.pop(name)

    def issue(self, net: Network, now: float) -> tuple[str, ...]:
        """One fresh ticket per queue; older unclaimed tickets of `net` stop working."""
        self._drop_tickets(lambda e: e.network != net.name)
        out = tuple(self._token() for _ in range(net.queues))
        assert len(set(out)) == net.queues and not set(out) & set(self.tickets)
        self.tickets.update((t, TicketEntry(net.name, q, net.worker_uid, now + self.ticket_ttl))
                            for q, t in enumerate(out))
        return out

    def claim(self, token: str, uid: int, now: float) -> tuple[Network, int]:
        """Consume a ticket. A wrong uid does not consume it (it is still the worker's)."""
        self._drop_tickets(lambda e: e.expires > now - self.ticket_ttl)  # keep recent ones to say EXPIRED
        entry = self.tickets.get(token)
        if entry is None:
            raise PolicyRefused(ErrorCode.NOT_FOUND, "unknown or already used ticket")
        if entry.expires <= now:
            del self.tickets[token]
            raise PolicyRefused(ErrorCode.EXPIRED, "ticket expired")
        if entry.uid != uid:
            raise PolicyRefused(ErrorCode.NOT_PERMITTED, "ticket is bound to another uid")
        del self.tickets[token]
        return self.networks[entry.network], entry.queue
