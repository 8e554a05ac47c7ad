"""Constrained field types shared by the message modules."""

from __future__ import annotations

import enum
from typing import Annotated

from .constants import (
    FEATURES_MAX,
    IFNAME_MAX,
    MAX_ADDRESSES_PER_NETWORK,
    MAX_PREFIXES_PER_LIST,
    NETWORK_NAME_MAX,
    NODE_ID_MAX,
    REASON_MAX,
    TICKET_BYTES,
)
from .schema import U64, InterfaceStr, Items, PrefixStr, Text

NetworkName = Annotated[str, Text(NETWORK_NAME_MAX, r"[a-z0-9][a-z0-9_-]{0,%d}" % (NETWORK_NAME_MAX - 1))]
IfName = Annotated[str, Text(IFNAME_MAX, r"[a-z0-9-]{1,%d}" % IFNAME_MAX)]
NodeId = Annotated[str, Text(NODE_ID_MAX, r"[A-Za-z0-9._-]{1,%d}" % NODE_ID_MAX)]
Reason = Annotated[str, Text(REASON_MAX)]
#: Single-use fd ticket: URL-safe base64 of TICKET_BYTES random bytes.
Ticket = Annotated[str, Text(TICKET_BYTES * 4 // 3, r"[A-Za-z0-9_-]{%d}" % (TICKET_BYTES * 4 // 3))]
#: Pinned key fingerprint: "SHA256:" + unpadded base64 of a 32-byte digest.
Fingerprint = Annotated[str, Text(50, r"SHA256:[A-Za-z0-9+/]{43}")]
Path = Annotated[str, Text(4096, r"/[^\x00]*")]
Prefixes = Annotated[tuple[PrefixStr, ...], Items(MAX_PREFIXES_PER_LIST)]
Interfaces = Annotated[tuple[InterfaceStr, ...], Items(MAX_ADDRESSES_PER_NETWORK)]
Features = Annotated[tuple[Annotated[str, Text(32, r"[a-z0-9_.-]{1,32}")], ...], Items(FEATURES_MAX)]
Counts = Annotated[dict[Annotated[str, Text(64, r"[a-z0-9_]{1,64}")], U64], Items(128)]


class PeerRole(enum.StrEnum):
    """Which side of the QUIC connection a network's worker plays."""

    LISTEN = "listen"
    CONNECT = "connect"
