"""The worker's calls to the helper: claim its queue fd, protect its UDP socket.

Synchronous, before the event loop starts. One AF_UNIX SOCK_SEQPACKET
connection; one message per packet, fds as SCM_RIGHTS (`l3ptp.ipc.seqpacket`).
Every reply goes through `HELPER_REPLIES.decode_expect`; a `Failed` reply
raises `HelperFailed`, a closed connection or anything unexpected
`HelperUnavailable` (both `HelperError`, the errors of the controller's
client too, ipc/errors.py).
"""

from __future__ import annotations

import socket

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_MESSAGE_MAX
from l3ptp.ipc.errors import DecodeError, HelperError, HelperFailed, HelperUnavailable
from l3ptp.ipc.helper_messages import (
    HELPER_PROTOCOL,
    HELPER_REPLIES,
    HELPER_REQUESTS,
    ClaimQueue,
    Failed,
    Hello,
    ProtectSocket,
    QueueGranted,
    Role,
    SocketProtected,
    Welcome,
)
from l3ptp.ipc.schema import Message

__all__ = ["HelperError", "HelperFailed", "HelperUnavailable", "WorkerHelperClient"]

_TIMEOUT = 10.0


class WorkerHelperClient:
    """The worker's synchronous helper session (the controller's is controller/helper_client.py)."""

    def __init__(self, path: str | None = None, *, sock: socket.socket | None = None) -> None:
        if sock is None:
            assert path is not None
            sock = seqpacket.connect(path, _TIMEOUT)
            sock.settimeout(_TIMEOUT)
        self.sock = sock
        self._request(Hello(role=Role.WORKER, protocol=HELPER_PROTOCOL), Welcome)

    def _request(self, msg: Message, expect: type[Message], fds: list[int] | None = None) -> tuple[Message, list[int]]:
        seqpacket.send(self.sock, HELPER_REQUESTS.encode(msg), fds or ())
        got_fds: list[int] = []
        try:
            reply, got_fds = seqpacket.recv(self.sock, HELPER_MESSAGE_MAX, 1)
            answer = HELPER_REPLIES.decode_expect(reply, expect, Failed)
        except seqpacket.PeerClosed:
            raise HelperUnavailable(f"{type(msg).__name__}: helper closed the connection") from None
        except DecodeError as exc:  # a FramingError too: over the cap, more than one fd, other ancillary data
            seqpacket.close_fds(got_fds)
            raise HelperUnavailable(f"{type(msg).__name__}: bad reply: {exc}") from None
        if isinstance(answer, Failed):
            seqpacket.close_fds(got_fds)
            raise HelperFailed(answer.code, answer.reason, type(msg).__name__)
        return answer, got_fds

    def claim_queue(self, ticket: str) -> tuple[QueueGranted, int]:
        """Present the ticket; return the grant and the queue fd."""
        answer, fds = self._request(ClaimQueue(ticket=ticket), QueueGranted)
        if len(fds) != 1:
            seqpacket.close_fds(fds)
            raise HelperUnavailable("QueueGranted without exactly one fd")
        assert isinstance(answer, QueueGranted)
        return answer, fds[0]

    def protect_socket(self, sock: socket.socket, network: str | None = None, queue: int = 0,
                       shared: bool = False, ticket: str | None = None) -> SocketProtected:
        """Ask the helper to mark the UDP socket, and with `shared` to steer `network`'s port to it for `queue`
        (the queue claimed on this connection, or the one `ticket` names)."""
        answer, fds = self._request(ProtectSocket(network=network, queue=queue, shared=shared, ticket=ticket),
                                    SocketProtected, [sock.fileno()])
        seqpacket.close_fds(fds)
        assert isinstance(answer, SocketProtected)
        return answer

    def close(self) -> None:
        self.sock.close()
