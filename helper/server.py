"""The helper's single-threaded `selectors` loop over AF_UNIX SOCK_SEQPACKET (`l3ptp.ipc.seqpacket`).

Every request is answered or its connection closed, whatever happens inside: a framing error (over
HELPER_MESSAGE_MAX, more than HELPER_MAX_FDS_PER_MESSAGE fds, other ancillary data), a decode error, a
`Violation`, no Hello within HELPER_HELLO_TIMEOUT or silence past the role's idle time-out audits and closes
that one connection; an exception inside a request (a bug) is audited and answered `Failed(INTERNAL)`.
Sessions are bounded in all, per uid and with room reserved for the controller (ipc.constants).
Received fds, and connections we drop, are closed on `Closer` threads; a queue fd goes with its reply.
"""

import contextlib
import grp
import os
import queue
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Iterable

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import (HELPER_ACCEPT_BATCH, HELPER_CLOSE_BACKLOG, HELPER_CLOSE_THREADS,
                                 HELPER_CONTROLLER_RESERVED, HELPER_HELLO_TIMEOUT, HELPER_IDLE_TIMEOUT_CONTROLLER,
                                 HELPER_IDLE_TIMEOUT_WORKER, HELPER_LISTEN_BACKLOG, HELPER_MAX_FDS_PER_MESSAGE,
                                 HELPER_MAX_SESSIONS, HELPER_MAX_SESSIONS_PER_UID, HELPER_MESSAGE_MAX, SCM_MAX_FD)
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.helper_messages import HELPER_REPLIES, HELPER_REQUESTS, Role

from .dispatch import Dispatcher, Peer, Session, Violation

MAX_FDS_PER_MESSAGE = HELPER_MAX_FDS_PER_MESSAGE
_CRED = struct.Struct("iII")
_HELPER = Session(Peer(None, None, None))  # type: ignore[arg-type]  # audit lines about no peer


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
    sock.listen(HELPER_LISTEN_BACKLOG)
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


class Closer:
    """Closes fds on up to `threads` daemon threads, never on the loop.

    The last close of a file can block as long as whoever made it likes (a TCP socket with SO_LINGER and unsent
    data, a FUSE file's flush, a tty draining), and so can closing a connection that holds such fds in its queue.
    Resetting SO_LINGER first would race a sender that kept a copy and covers sockets only. A thread is started when
    none is idle; past `backlog` fds waiting (every thread stuck) the caller's thread closes.
    """

    def __init__(self, threads: int = HELPER_CLOSE_THREADS, backlog: int = HELPER_CLOSE_BACKLOG) -> None:
        self.max_threads, self.backlog = threads, backlog
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending = self._idle = self._threads = 0

    def close(self, fds: Iterable[int]) -> None:
        for fd in fds:
            with self._lock:
                inline = self.pending >= self.backlog
                self.pending += not inline
                start = not inline and self._idle < self.pending and self._threads < self.max_threads
                self._threads += start
            if inline:
                seqpacket.close_fds([fd])
                continue
            if start:
                threading.Thread(target=self._run, name="l3ptp-close", daemon=True).start()
            self._queue.put(fd)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fd = self._queue.get()
            with self._lock:
                self._idle -= 1
            if fd < 0:
                return
            seqpacket.close_fds([fd])
            with self._lock:
                self.pending -= 1

    def stop(self) -> None:
        """Let idle threads end (a stuck close keeps its thread until it returns)."""
        for _ in range(self._threads):
            self._queue.put(-1)


class Server:
    def __init__(self, dispatcher: Dispatcher, listener: socket.socket, hello_timeout: float = HELPER_HELLO_TIMEOUT,
                 idle_timeout: dict[Role, float] | None = None) -> None:
        self.dispatcher, self.listener, self.hello_timeout = dispatcher, listener, hello_timeout
        self.idle_timeout = idle_timeout or {Role.CONTROLLER: HELPER_IDLE_TIMEOUT_CONTROLLER,
                                             Role.WORKER: HELPER_IDLE_TIMEOUT_WORKER}
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[socket.socket, Session] = {}
        self.closer = Closer()
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ)

    def drop(self, conn: socket.socket) -> None:
        self.sessions.pop(conn, None)
        self.sel.unregister(conn)
        self.closer.close([conn.detach()])

    def step(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            conn = key.fileobj
            try:
                if conn is self.listener:
                    self._accept()
                elif conn in self.sessions:
                    self._read(conn, self.sessions[conn])  # type: ignore[arg-type, index]
            except Exception as exc:  # a bug: that connection goes, every other one and every network stays
                if conn is not self.listener and conn in self.sessions:
                    self.dispatcher.failure(self.sessions[conn], "receive", exc)  # type: ignore[index]
                    self.drop(conn)  # type: ignore[arg-type]
                else:
                    self.dispatcher.failure(_HELPER, "accept", exc)
        now = self.dispatcher.clock()
        for conn, s in list(self.sessions.items()):
            if s.role is None and now - s.since >= self.hello_timeout:
                self.dispatcher.violation(s, "Hello", f"no Hello within {self.hello_timeout} s")
                self.drop(conn)
            elif s.role is not None and now - s.last >= self.idle_timeout[s.role]:
                self.dispatcher.violation(s, "idle", f"no request within {self.idle_timeout[s.role]} s", "timeout")
                self.drop(conn)
        self.dispatcher.flush_audit()

    def close(self) -> None:
        for conn in list(self.sessions):
            self.drop(conn)
        self.sel.unregister(self.listener)
        self.listener.close()
        self.sel.close()
        self.closer.stop()

    def _accept(self) -> None:
        for _ in range(HELPER_ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the loop goes on, the backlog waits
                self.dispatcher.violation(_HELPER, "accept", exc.strerror or str(exc), "error")
                return
            session = Session(peer_of(conn), since=self.dispatcher.clock(), last=self.dispatcher.clock())
            reason = self._admit(session.peer)
            if reason is not None:
                self.dispatcher.violation(session, "accept", reason, "refused")
                self.closer.close([conn.detach()])
                continue
            conn.setblocking(False)
            self.sessions[conn] = session
            self.sel.register(conn, selectors.EVENT_READ)

    def _admit(self, peer: Peer) -> str | None:
        """None to take a connection of `peer`, after closing its uid's least recently active one when at a limit."""
        policy = self.dispatcher.policy
        if peer.uid not in policy.controller_uids and peer.uid not in policy.worker_uids:
            return f"uid {peer.uid} is in neither uid list of the policy"
        mine = [(s.last, i, c) for i, (c, s) in enumerate(self.sessions.items()) if s.peer.uid == peer.uid]
        others = sum(s.peer.uid not in policy.controller_uids for s in self.sessions.values())
        if (len(mine) < HELPER_MAX_SESSIONS_PER_UID and len(self.sessions) < HELPER_MAX_SESSIONS
                and (peer.uid in policy.controller_uids or others < HELPER_MAX_SESSIONS - HELPER_CONTROLLER_RESERVED)):
            return None
        if not mine:
            return "too many clients"
        oldest = min(mine)[2]
        self.dispatcher.violation(self.sessions[oldest], "evict", "a newer connection of this uid", "timeout")
        self.drop(oldest)
        return None

    def _read(self, conn: socket.socket, session: Session) -> None:
        try:
            data, fds = seqpacket.recv(conn, HELPER_MESSAGE_MAX, SCM_MAX_FD, self.closer.close)
        except (BlockingIOError, InterruptedError):
            return
        except (seqpacket.PeerClosed, OSError):
            return self.drop(conn)
        except seqpacket.FramingError as exc:
            self.dispatcher.violation(session, "receive", exc.reason)
            return self.drop(conn)
        session.last = self.dispatcher.clock()
        try:
            answer = self._answer(session, data, fds)
        finally:
            self.closer.close(fds)
        if answer is None:
            return self.drop(conn)  # a violation, already audited
        try:
            seqpacket.send(conn, *answer)
        except OSError:
            self.drop(conn)  # a client that does not read its replies is dropped

    def _answer(self, session: Session, data: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
        """The encoded reply and its fds, or None to close the connection. Raises nothing."""
        if len(fds) > MAX_FDS_PER_MESSAGE:
            self.dispatcher.violation(session, "receive", f"{len(fds)} fds, at most {MAX_FDS_PER_MESSAGE}")
            return None
        action = "decode"
        try:
            request = HELPER_REQUESTS.decode_untrusted(data)
            action = type(request).__name__
            outcome = self.dispatcher.handle(session, request, fds)
            return HELPER_REPLIES.encode(outcome.reply), [] if outcome.fd is None else [outcome.fd]
        except DecodeError as exc:
            self.dispatcher.violation(session, "decode", exc.reason[:200])
        except Violation:
            pass
        except Exception as exc:  # a bug inside the request (its reply's encoding too): answered, nothing torn down
            with contextlib.suppress(Exception):
                return HELPER_REPLIES.encode(self.dispatcher.failure(session, action, exc).reply), []
        return None
