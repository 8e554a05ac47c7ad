"""`python -m l3ptp.worker` as a subprocess: config on stdin, fake helper, zmq bus."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import zmq

from l3ptp.ipc import seqpacket
from l3ptp.ipc.constants import HELPER_MESSAGE_MAX
from l3ptp.ipc.control_messages import (
    BUS_DOWN,
    BUS_UP,
    WORKER_CONFIG,
    Shutdown,
    WorkerExiting,
    WorkerHello,
    WorkerStatus,
)
from l3ptp.ipc.errors import ErrorCode
from l3ptp.ipc.helper_messages import (
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
from l3ptp.ipc.types import PeerRole
from tests.support.fake_tun import FakeTun
from tests.support.worker_fixtures import make_config, new_keys, udp_socket

pytestmark = pytest.mark.timeout(90)


class FakeHelper(threading.Thread):
    """Serves one worker connection: Welcome, QueueGranted + fd, SocketProtected."""

    def __init__(self, path: str, tun_fd: int, refuse_claim: bool = False) -> None:
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.tun_fd = tun_fd
        self.refuse_claim = refuse_claim
        self.requests: list[str] = []
        self.protected_fd_family: int | None = None

    def run(self) -> None:
        try:
            self._serve()
        finally:
            self.listener.close()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(30)
        with conn:
            while True:
                try:
                    data, fds = seqpacket.recv(conn, HELPER_MESSAGE_MAX, 2)
                except (OSError, seqpacket.FramingError):
                    return
                req = HELPER_REQUESTS.decode_untrusted(data)
                self.requests.append(type(req).__name__)
                if isinstance(req, Hello):
                    conn.send(HELPER_REPLIES.encode(Welcome(role=Role.WORKER, protocol=1, uid=0)))
                elif isinstance(req, ClaimQueue) and self.refuse_claim:
                    conn.send(HELPER_REPLIES.encode(Failed(code=ErrorCode.EXPIRED, reason="ticket expired")))
                elif isinstance(req, ClaimQueue):
                    reply = HELPER_REPLIES.encode(QueueGranted(name="net0", ifname="l3p-net0", queue=0, mtu=1280))
                    seqpacket.send(conn, reply, [self.tun_fd])
                elif isinstance(req, ProtectSocket):
                    with socket.socket(fileno=fds[0]) as s:
                        self.protected_fd_family = s.family
                    conn.send(HELPER_REPLIES.encode(SocketProtected(mark=0x4C33)))


def _spawn(config) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "l3ptp.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(WORKER_CONFIG.encode(config))
    proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not touch it
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def _recv(router: zmq.Socket, timeout_ms: int = 10000):
    if not router.poll(timeout_ms):
        return None, None
    ident, data = router.recv_multipart()
    return ident, BUS_UP.decode_untrusted(data)


def _config(tmp_path, **kw):
    lk, ck = new_keys(), new_keys()
    # A connector toward a closed loopback port: the worker runs, retries, reports.
    with udp_socket() as s:
        port = s.getsockname()[1]
    base = make_config(PeerRole.CONNECT, own=ck, peer_fp=lk.fingerprint, port=port)
    return dataclasses.replace(
        base, helper_socket=str(tmp_path / "helper.sock"), bus_endpoint=f"ipc://{tmp_path}/bus.sock", **kw
    )


@contextlib.contextmanager
def _worker_process(
    tmp_path, refuse_claim: bool = False
) -> Iterator[tuple[zmq.Socket, FakeHelper, subprocess.Popen[bytes]]]:
    """The worker subprocess, its bus (a bound ROUTER) and a FakeHelper serving it a FakeTun; reaped on exit."""
    config = _config(tmp_path)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(config.bus_endpoint)
    with FakeTun() as tun:
        helper = FakeHelper(config.helper_socket, tun.worker_fd, refuse_claim=refuse_claim)
        helper.start()
        proc = _spawn(config)
        try:
            yield router, helper, proc
        finally:
            _reap(proc)
            router.close()
            ctx.term()
            helper.join(5)


def test_worker_process_claims_fd_reports_and_shuts_down(tmp_path) -> None:
    with _worker_process(tmp_path) as (router, helper, proc):
        ident, hello = _recv(router)
        assert isinstance(hello, WorkerHello) and hello.pid == proc.pid
        _, status = _recv(router)
        assert isinstance(status, WorkerStatus)
        assert status.state in ("starting", "handshaking", "backoff", "connecting")
        router.send_multipart([ident, BUS_DOWN.encode(Shutdown(reason="test"))])
        last = None
        for _ in range(50):
            _, msg = _recv(router, 5000)
            if msg is None or isinstance(msg, WorkerExiting):
                last = msg
                break
        assert isinstance(last, WorkerExiting) and not last.fatal and "test" in last.reason
        stdout, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
    out = stdout.decode()
    assert helper.requests == ["Hello", "ClaimQueue", "ProtectSocket"]
    assert helper.protected_fd_family in (socket.AF_INET, socket.AF_INET6)
    assert '"cap_eff": 0' in out and '"no_new_privs": 1' in out


def test_helper_refusal_is_fatal(tmp_path) -> None:
    with _worker_process(tmp_path, refuse_claim=True) as (router, _, proc):
        _, msg = _recv(router)
        assert isinstance(msg, WorkerExiting) and msg.fatal and "EXPIRED" in msg.reason
        proc.communicate(timeout=10)
        assert proc.returncode == 2


def test_udp_socket_asks_for_large_buffers() -> None:
    """The worker's UDP socket gets buffers as large as the kernel allows, up to UDP_SOCKET_BUFFER."""
    from l3ptp.ipc.constants import UDP_SOCKET_BUFFER
    from l3ptp.worker.__main__ import make_udp_socket

    def limit(name: str) -> int:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read())

    cfg = make_config(PeerRole.CONNECT, own=new_keys(), peer_fp=new_keys().fingerprint, port=4433)
    sock = make_udp_socket(cfg)
    try:
        for opt, name in ((socket.SO_RCVBUF, "rmem_max"), (socket.SO_SNDBUF, "wmem_max")):
            # Linux reports twice the granted size (bookkeeping overhead).
            assert sock.getsockopt(socket.SOL_SOCKET, opt) == 2 * min(UDP_SOCKET_BUFFER, limit(name))
    finally:
        sock.close()
