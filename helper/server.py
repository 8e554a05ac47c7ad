"""The helper's single-threaded `selectors` loop over AF_UNIX SOCK_SEQPACKET.

One message per packet, at most HELPER_MESSAGE_MAX bytes: MSG_TRUNC or
MSG_CTRUNC, a decode error or a `Violation` audits and closes that one
connection; the loop keeps serving everyone else. Every fd received as
SCM_RIGHTS is closed after the request is handled (ProtectSocket uses it
first). A reply carrying a queue fd goes out with `socket.send_fds`.
"""

from __future__ import annotations

import array
import grp
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable

from l3ptp.ipc.constants import HELPER_MESSAGE_MAX
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.helper_messages import HELPER_REPLIES, HELPER_REQUESTS

from .dispatch import Dispatcher, Peer, Session, Violation

MAX_FDS_PER_MESSAGE = 4
MAX_CLIENTS = 128
_CRED = struct.Struct("iII")


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


def open_listener(path: str, group: str | int | None) -> socket.socket:
    """Bind a fresh SOCK_SEQPACKET socket at `path`, mode 0660, group `group`."""
    os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of ours; anything else makes bind fail
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


def systemd_listener() -> socket.socket | None:
    """The socket passed by systemd socket activation as fd 3, if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise OSError("LISTEN_FDS socket is not AF_UNIX SOCK_SEQPACKET")
    return sock


class Server:
    def __init__(self, dispatcher: Dispatcher, listener: socket.socket | None = None) -> None:
        self.dispatcher = dispatcher
        self.sel = selectors.DefaultSelector()
        self.listener = listener
        self.sessions: dict[socket.socket, Session] = {}
        if listener is not None:
            listener.setblocking(False)
            self.sel.register(listener, selectors.EVENT_READ)

    def add_connection(self, conn: socket.socket) -> Session:
        conn.setblocking(False)
        session = Session(peer_of(conn))
        self.sessions[conn] = session
        self.sel.register(conn, selectors.EVENT_READ)
        return session

    def drop(self, conn: socket.socket) -> None:
        self.sessions.pop(conn, None)
        self.sel.unregister(conn)
        conn.close()

    def step(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            if conn is self.listener:
                self._accept()
            elif conn in self.sessions:
                self._read(conn, self.sessions[conn])

    def serve(self, running: Callable[[], bool], timeout: float = 1.0) -> None:
        while running():
            self.step(timeout)

    def close(self) -> None:
        for conn in list(self.sessions):
            self.drop(conn)
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
        self.sel.close()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.sessions) >= MAX_CLIENTS:
            self.dispatcher.violation(Session(peer_of(conn)), "accept", "too many clients")
            conn.close()
            return
        self.add_connection(conn)

    def _read(self, conn: socket.socket, session: Session) -> None:
        fds: list[int] = []
        try:
            data, ancdata, flags, _ = conn.recvmsg(HELPER_MESSAGE_MAX, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(conn)
            return
        try:
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", cdata[: len(cdata) - len(cdata) % 4]))
            if not data and not fds:
                self.drop(conn)  # EOF
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                what = "message over size cap" if flags & socket.MSG_TRUNC else "truncated control data"
                self.dispatcher.violation(session, "receive", what)
                self.drop(conn)
                return
            try:
                request = HELPER_REQUESTS.decode_untrusted(data)
            except DecodeError as exc:
                self.dispatcher.violation(session, "decode", exc.reason[:200])
                self.drop(conn)
                return
            try:
                outcome = self.dispatcher.handle(session, request, fds)
            except Violation:
                self.drop(conn)
                return
        finally:
            for fd in fds:
                os.close(fd)
        payload = HELPER_REPLIES.encode(outcome.reply)
        try:
            if outcome.fd is None:
                conn.send(payload)
            else:
                socket.send_fds(conn, [payload], [outcome.fd])
        except OSError:
            self.drop(conn)  # a client that does not read its replies is dropped
