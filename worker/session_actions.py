"""The actions a `session.Session` returns to its shell (worker/connections.py carries them out).

Pure data. Kept apart from the state machine so that each stays short; `session` re-exports them.
"""

from __future__ import annotations

import dataclasses

from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.schema import Message

__all__ = ["Action", "Closed", "Established", "RenewRequested", "RoutesChanged", "Send"]


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclasses.dataclass(frozen=True, slots=True)
class Established:
    mtu: int
    #: Context id we put on DATAGRAMs we send (the peer's choice).
    tx_context_id: int
    #: Context id we accept on DATAGRAMs we receive (our choice).
    rx_context_id: int
    peer_tunnel_addresses: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RoutesChanged:
    epoch: int
    routes: tuple[str, ...]
    tunnel_addresses: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Closed:
    code: ErrorCode
    reason: str
    #: True when we closed (and sent CLOSE); False when the peer did.
    local: bool
    #: What the peer is told (CLOSE and the QUIC reason phrase) when it must
    #: not learn `reason` (authentication failures); None: `reason`.
    peer_reason: str | None = None

    @property
    def wire_reason(self) -> str:
        return self.reason if self.peer_reason is None else self.peer_reason


@dataclasses.dataclass(frozen=True, slots=True)
class RenewRequested:
    """Connector: the listener sent RENEW; `reason` is its text, escaped."""

    reason: str


Action = Send | Established | RoutesChanged | Closed | RenewRequested
