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
import resource
import selectors
import socket
import stat
import struct

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import (HELPER_ACCEPT_BATCH, HELPER_CLOSE_BACKLOG, HELPER_CLOSE_THREADS,
                                 HELPER_CONTROLLER_RESERVED, HELPER_HELLO_TIMEOUT, HELPER_IDLE_TIMEOUT_CONTROLLER,
                                 HELPER_IDLE_TIMEOUT_WORKER, HELPER_LISTEN_BACKLOG, HELPER_MAX_FDS_PER_MESSAGE,
                                 HELPER_MAX_SESSIONS, HELPER_MAX_SESSIONS_PER_UID, HELPER_MESSAGE_MAX, SCM_MAX_FD)
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.helper_messages import HELPER_REPLIES, HELPER_REQUESTS, Role

from .dispatch import ClientCreds, ClientSession, Dispatcher, Violation
from .policy import Policy

MAX_FDS_PER_MESSAGE = HELPER_MAX_FDS_PER_MESSAGE
_CRED = struct.Struct("iII")
_HELPER = ClientSession(ClientCreds(None, None, None))  # type: ignore[arg-type]  # audit lines about no peer
_IDLE = {Role.CONTROLLER: HELPER_IDLE_TIMEOUT_CONTROLLER, Role.WORKER: HELPER_IDLE_TIMEOUT_WORKER}


def peer_of(conn: socket.socket) -> ClientCreds:
    return ClientCreds(*_CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)))


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


def raise_fd_limit(policy: Policy) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (up to the hard one) to what the policy's limits can hold open: (limit, need)."""
    need = policy.max_networks * policy.max_queues + HELPER_MAX_SESSIONS + HELPER_CLOSE_BACKLOG + SCM_MAX_FD + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft, need


class Server:
    def __init__(self, dispatcher: Dispatcher, listener: socket.socket, hello_timeout: float = HELPER_HELLO_TIMEOUT
                 ) -> None:
        self.dispatcher, self.listener, self.hello_timeout = dispatcher, listener, hello_timeout
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[socket.socket, ClientSession] = {}
        self.closer = seqpacket.Closer(HELPER_CLOSE_THREADS, HELPER_CLOSE_BACKLOG)
        limit, need = raise_fd_limit(dispatcher.policy)
        if limit < need:
            dispatcher.violation(_HELPER, "start", f"RLIMIT_NOFILE {limit} is below the {need} the policy needs", "error")
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ)

    def drop(self, conn: socket.socket) -> None:
        self.sessions.pop(conn, None)
        self.sel.unregister(conn)
        self.closer.close([conn.detach()])

    def step(self, timeout: float | None) -> None:
        """One turn of the loop. Raises nothing: the caller's shutdown path would tear every network down."""
        try:
            self._step(timeout)
        except Exception as exc:  # a bug outside any one connection: audited, the loop and every network go on
            self.dispatcher.failure(_HELPER, "step", exc)

    def _step(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            conn = key.fileobj
            try:
                if conn is self.listener:
                    self._accept()
                elif conn in self.sessions:
                    self._read(conn, self.sessions[conn])  # type: ignore[arg-type, index]
            except Exception as exc:  # a bug: that connection goes, every other one and every network stays
                self.dispatcher.failure(self.sessions.get(conn, _HELPER), "step", exc)  # type: ignore[call-overload]
                if conn in self.sessions:
                    self.drop(conn)  # type: ignore[arg-type]
        now = self.dispatcher.clock()
        for conn, s in list(self.sessions.items()):
            if s.role is None and now - s.since >= self.hello_timeout:
                self.dispatcher.violation(s, "Hello", f"no Hello within {self.hello_timeout} s")
                self.drop(conn)
            elif s.role is not None and now - s.last >= _IDLE[s.role]:
                self.dispatcher.violation(s, "idle", f"no request within {_IDLE[s.role]} s", "timeout")
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
            session = ClientSession(peer_of(conn), since=self.dispatcher.clock(), last=self.dispatcher.clock())
            reason = self._admit(session.peer)
            if reason is not None:
                self.dispatcher.violation(session, "accept", reason, "refused")
                self.closer.close([conn.detach()])
                continue
            conn.setblocking(False)
            self.sessions[conn] = session
            self.sel.register(conn, selectors.EVENT_READ)

    def _admit(self, peer: ClientCreds) -> str | None:
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
        self.dispatcher.violation(self.sessions[oldest], "evict", "a newer connection of this uid", "evicted")
        self.drop(oldest)
        return None

    def _read(self, conn: socket.socket, session: ClientSession) -> None:
        try:  # every fd that came is received (none closed inside recvmsg, on this thread), then given to the closer
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
        try:
            if answer is not None:
                return seqpacket.send(conn, *answer)
        except OSError:
            pass  # a client that does not read its replies is dropped
        self.drop(conn)

    def _answer(self, session: ClientSession, data: bytes, fds: list[int]) -> tuple[bytes, list[int]] | None:
        """The encoded reply and its fds, or None to close the connection (audited). Raises nothing."""
        action = "decode"
        try:
            if len(fds) > MAX_FDS_PER_MESSAGE:
                return self.dispatcher.violation(session, "receive", f"{len(fds)} fds, at most {MAX_FDS_PER_MESSAGE}")
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
