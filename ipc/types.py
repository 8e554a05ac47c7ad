"""Constrained field types shared by the message modules."""

from __future__ import annotations

import enum
from typing import Annotated, Final

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

#: Full-match patterns, shared with the controller's configuration (controller/config/schema.py).
NETWORK_NAME_PATTERN: Final = r"[a-z0-9][a-z0-9_-]{0,%d}" % (NETWORK_NAME_MAX - 1)
NODE_ID_PATTERN: Final = r"[A-Za-z0-9._-]{1,%d}" % NODE_ID_MAX
#: A key fingerprint is FINGERPRINT_PREFIX + unpadded standard base64 of a
#: FINGERPRINT_DIGEST_LEN-byte SHA-256 digest (FINGERPRINT_CHARS characters).
FINGERPRINT_PREFIX: Final = "SHA256:"
FINGERPRINT_DIGEST_LEN: Final = 32
FINGERPRINT_CHARS: Final = (FINGERPRINT_DIGEST_LEN * 4 + 2) // 3
FINGERPRINT_PATTERN: Final = FINGERPRINT_PREFIX + r"[A-Za-z0-9+/]{%d}" % FINGERPRINT_CHARS

NetworkName = Annotated[str, Text(NETWORK_NAME_MAX, NETWORK_NAME_PATTERN)]
IfName = Annotated[str, Text(IFNAME_MAX, r"[a-z0-9-]{1,%d}" % IFNAME_MAX)]
NodeId = Annotated[str, Text(NODE_ID_MAX, NODE_ID_PATTERN)]
Reason = Annotated[str, Text(REASON_MAX)]
#: Single-use fd ticket: URL-safe base64 of TICKET_BYTES random bytes.
Ticket = Annotated[str, Text(TICKET_BYTES * 4 // 3, r"[A-Za-z0-9_-]{%d}" % (TICKET_BYTES * 4 // 3))]
#: Pinned key fingerprint: "SHA256:" + unpadded base64 of a 32-byte digest.
Fingerprint = Annotated[str, Text(len(FINGERPRINT_PREFIX) + FINGERPRINT_CHARS, FINGERPRINT_PATTERN)]
Path = Annotated[str, Text(4096, r"/[^\x00]*")]
Prefixes = Annotated[tuple[PrefixStr, ...], Items(MAX_PREFIXES_PER_LIST)]
Interfaces = Annotated[tuple[InterfaceStr, ...], Items(MAX_ADDRESSES_PER_NETWORK)]
Features = Annotated[tuple[Annotated[str, Text(32, r"[a-z0-9_.-]{1,32}")], ...], Items(FEATURES_MAX)]
Counts = Annotated[dict[Annotated[str, Text(64, r"[a-z0-9_]{1,64}")], U64], Items(128)]


class PeerRole(enum.StrEnum):
    """Which side of the QUIC connection a network's worker plays."""

    LISTEN = "listen"
    CONNECT = "connect"
