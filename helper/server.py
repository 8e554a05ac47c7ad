"""The helper's single-threaded `selectors` loop over AF_UNIX SOCK_SEQPACKET (`l3ptp.ipc.seqpacket`).

A framing error (over HELPER_MESSAGE_MAX, truncated or unexpected ancillary data), a decode error, a
`Violation` or no Hello within `hello_timeout` seconds audits and closes that one connection; everyone
else keeps being served. EOF closes it unaudited.
Fds received as SCM_RIGHTS are closed once the request is handled; a queue fd goes with its reply.
"""

import contextlib
import grp
import os
import selectors
import socket
import stat
import struct

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_HELLO_TIMEOUT, HELPER_MESSAGE_MAX
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.helper_messages import HELPER_REPLIES, HELPER_REQUESTS

from .dispatch import Dispatcher, Outcome, Peer, Session, Violation

MAX_FDS_PER_MESSAGE, MAX_CLIENTS = 4, 128
_CRED = struct.Struct("iII")


def peer_of(conn: socket.socket) -> Peer:
    return Peer(*_CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)))


def open_listener(path: str, group: str | int | None) -> socket.socket:
    """Bind a fresh SOCK_SEQPACKET socket at `path`, mode 0660, group `group`."""
    os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of ours; anything else makes bind fail
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
    def __init__(self, dispatcher: Dispatcher, listener: socket.socket, hello_timeout: float = HELPER_HELLO_TIMEOUT):
        self.dispatcher, self.listener, self.hello_timeout = dispatcher, listener, hello_timeout
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[socket.socket, Session] = {}
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ)

    def drop(self, conn: socket.socket) -> None:
        self.sessions.pop(conn, None)
        self.sel.unregister(conn)
        conn.close()

    def step(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj in self.sessions:
                self._read(key.fileobj, self.sessions[key.fileobj])  # type: ignore[arg-type, index]
        late = self.dispatcher.clock() - self.hello_timeout
        for conn, s in list(self.sessions.items()):
            if s.role is None and s.since <= late:
                self.dispatcher.violation(s, "Hello", f"no Hello within {self.hello_timeout} s")
                self.drop(conn)

    def close(self) -> None:
        for conn in list(self.sessions):
            self.drop(conn)
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.sessions) >= MAX_CLIENTS:
            self.dispatcher.violation(Session(peer_of(conn)), "accept", "too many clients")
            return conn.close()
        conn.setblocking(False)
        self.sessions[conn] = Session(peer_of(conn), since=self.dispatcher.clock())
        self.sel.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket, session: Session) -> None:
        try:
            data, fds = seqpacket.recv(conn, HELPER_MESSAGE_MAX, MAX_FDS_PER_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except (seqpacket.PeerClosed, OSError):
            return self.drop(conn)
        except seqpacket.FramingError as exc:
            self.dispatcher.violation(session, "receive", exc.reason)
            return self.drop(conn)
        outcome: Outcome | None = None  # None closes the connection: a violation already audited
        try:
            outcome = self.dispatcher.handle(session, HELPER_REQUESTS.decode_untrusted(data), fds)
        except DecodeError as exc:
            self.dispatcher.violation(session, "decode", exc.reason[:200])
        except Violation:
            pass
        finally:
            seqpacket.close_fds(fds)
        if outcome is None:
            return self.drop(conn)
        try:
            seqpacket.send(conn, HELPER_REPLIES.encode(outcome.reply), [] if outcome.fd is None else [outcome.fd])
        except OSError:
            self.drop(conn)  # a client that does not read its replies is dropped
