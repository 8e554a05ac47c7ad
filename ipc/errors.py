"""Typed errors shared by every channel.

Receivers of outside bytes catch exactly one type per layer: `DecodeError` for
IPC and control-stream messages. A malformed input never raises anything else.
`ErrorCode` travels in error replies (helper `Failed`, CLI `CommandFailed`,
peer `Close`).
"""

from __future__ import annotations

import enum


class IpcError(Exception):
    """Base of every l3ptp IPC error."""


class DecodeError(IpcError):
    """Bytes from outside the process did not decode to an expected message.

    `reason` is a short, stable, human-readable explanation; `path` names the
    offending field (for example ``routes[3]``) when there is one.
    """

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class MessageTooLarge(DecodeError):
    """The message exceeded the channel's size cap; nothing was decoded."""


class UnexpectedMessage(DecodeError):
    """A well-formed message that this channel or state does not accept."""


class SchemaError(IpcError, ValueError):
    """A message was constructed locally with a value its schema forbids.

    This is a programming error in the sender, not bad outside input.
    """


class ErrorCode(enum.IntEnum):
    """Codes carried in error replies. Values are part of the IPC contract."""

    OK = 0
    BAD_REQUEST = 1
    NOT_PERMITTED = 2
    NOT_FOUND = 3
    EXISTS = 4
    LIMIT = 5
    OUT_OF_POLICY = 6
    SYSTEM = 7
    EXPIRED = 8
    BUSY = 9
    INVALID_CONFIG = 10
    UNAVAILABLE = 11
    # Peer control stream close codes.
    PROTOCOL_VIOLATION = 20
    VERSION_MISMATCH = 21
    AUTH_FAILED = 22
    NETWORK_MISMATCH = 23
    MTU_MISMATCH = 24
    SHUTDOWN = 25
    DEAD_PEER = 26
    INTERNAL = 27


class HelperError(IpcError):
    """Base of the errors of a helper client (the controller's and the worker's)."""


class HelperFailed(HelperError):
    """The helper answered `Failed(code, reason)` (to `request`, when the client names it)."""

    def __init__(self, code: ErrorCode, reason: str, request: str = "") -> None:
        self.code, self.reason, self.request = code, reason, request
        super().__init__(f"{request + ': ' if request else ''}{code.name}: {reason}")


class HelperUnavailable(HelperError):
    """No usable connection: not running, refused, timed out, closed or out of step (a bad reply)."""
