"""ZeroMQ ROUTER sockets of the controller: one for workers, one for the CLI.

Every received frame goes through the channel's `decode_untrusted`; a bad
frame (wrong frame count, oversize, undecodable, unexpected type) is counted
in `bad_frames`, logged, and dropped. Nothing a peer sends can raise out of
`recv`.
"""

from __future__ import annotations

import os

import structlog
import zmq
import zmq.asyncio

from l3ptp.ipc.codec import Channel
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.schema import Message

__all__ = ["Router"]

log = structlog.get_logger("l3ptp.controller.bus")


class Router:
    """A bound ROUTER that decodes `inbound` and encodes `outbound` messages."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        path: str,
        inbound: Channel,
        outbound: Channel,
        *,
        mode: int | None = None,
        group: int | None = None,
    ) -> None:
        """Bind `path`; it is created 0600 (umask), then chgrp `group`, then chmod `mode`.

        So nobody but the owner can connect before the final mode is set. A
        failed chgrp (the controller is not a member of the group) is logged
        as ``admin_group_not_applied`` and the socket keeps its group.
        """
        self.path = path
        self.inbound = inbound
        self.outbound = outbound
        self.bad_frames = 0
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, inbound.max_bytes + 1)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a previous controller
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(f"ipc://{path}")
        finally:
            os.umask(old_umask)
        # Under the controller unit the socket is born with the admin group
        # (its primary group) and chown(2) is refused by the system call
        # filter: only chgrp when the group differs.
        if group is not None and os.stat(path).st_gid != group:
            try:
                os.chown(path, -1, group)
            except OSError as exc:
                log.error("admin_group_not_applied", socket=path, gid=group, error=str(exc))
        if mode is not None:
            os.chmod(path, mode)

    async def recv(self) -> tuple[bytes, Message] | None:
        """Next (identity, message); None for a dropped bad frame."""
        frames = await self.sock.recv_multipart(copy=True)
        return self._decode(frames)

    async def recv_with_peer(self) -> tuple[bytes, Message, str | None] | None:
        """Next (identity, message, Peer-Address); None for a dropped bad frame.

        For ``ipc://`` connections libzmq sets the message property
        ``Peer-Address`` to ``"<host>:<uid>:<gid>:<pid>"`` from SO_PEERCRED
        (see `l3ptp.controller.polkit.parse_peer_address`); None when absent.
        """
        frames = await self.sock.recv_multipart(copy=False)
        peer: str | None = None
        if frames:
            try:
                peer = frames[-1].get("Peer-Address")
            except (zmq.ZMQError, UnicodeDecodeError):
                peer = None
        got = self._decode([f.bytes for f in frames])
        return None if got is None else (*got, peer)

    def _decode(self, frames: list[bytes]) -> tuple[bytes, Message] | None:
        if len(frames) != 2:
            self.bad_frames += 1
            log.warning("bad_frame", socket=self.path, reason=f"{len(frames)} frames")
            return None
        ident, data = frames
        try:
            return ident, self.inbound.decode_untrusted(data)
        except DecodeError as exc:
            self.bad_frames += 1
            log.warning("bad_frame", socket=self.path, reason=str(exc)[:200])
            return None

    async def send(self, ident: bytes, msg: Message) -> None:
        try:
            await self.sock.send_multipart([ident, self.outbound.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("send_dropped", socket=self.path, message=type(msg).__name__)

    def close(self, *, linger: int = 0) -> None:
        """Close and remove the socket file; `linger` ms for queued messages (a handover's last words)."""
        self.sock.close(linger=linger)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
