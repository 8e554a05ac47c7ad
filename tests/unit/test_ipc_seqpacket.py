"""ipc.seqpacket over real AF_UNIX SOCK_SEQPACKET socketpairs: packets, fds, and every way a packet is refused."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from l3ptp.ipc import seqpacket
from l3ptp.ipc.errors import DecodeError
from l3ptp.ipc.seqpacket import FramingError, PeerClosed

pytestmark = pytest.mark.timeout(30)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Three pipes' read ends to pass (write ends closed: only identity matters)."""
    fds = []
    for _ in range(3):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    yield fds
    seqpacket.close_fds(fds)


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_round_trip_with_fds(pair, pipes, count: int) -> None:
    a, b = pair
    base = _fd_count()
    seqpacket.send(a, b"hello %d" % count, pipes[:count])
    data, fds = seqpacket.recv(b, 64, 3)
    assert data == b"hello %d" % count and len(fds) == count
    assert all(_same_file(got, sent) for got, sent in zip(fds, pipes[:count], strict=True))
    assert all(got not in pipes for got in fds)  # new descriptors, the sender keeps its own
    seqpacket.close_fds(fds)
    assert _fd_count() == base


def test_packets_stay_apart_and_exactly_the_cap_fits(pair) -> None:
    a, b = pair
    seqpacket.send(a, b"x" * 100)
    seqpacket.send(a, b"y")
    assert seqpacket.recv(b, 100, 0) == (b"x" * 100, [])
    assert seqpacket.recv(b, 100, 0) == (b"y", [])


def test_empty_packet_with_fds_is_not_eof(pair, pipes) -> None:
    """The helper then fails to decode b"" (a violation), it does not mistake it for a hang-up."""
    a, b = pair
    seqpacket.send(a, b"", pipes[:1])
    data, fds = seqpacket.recv(b, 64, 1)
    assert data == b"" and len(fds) == 1
    seqpacket.close_fds(fds)


def _refused(sock: socket.socket, max_size: int, max_fds: int) -> FramingError:
    with pytest.raises(FramingError) as info:
        seqpacket.recv(sock, max_size, max_fds)
    assert isinstance(info.value, DecodeError)  # what every receiver of outside bytes already catches
    return info.value


def test_over_size_cap_is_refused_and_its_fds_closed(pair, pipes) -> None:
    a, b = pair
    base = _fd_count()
    seqpacket.send(a, b"z" * 65, pipes)
    assert _refused(b, 64, 3).reason == "message over size cap"
    assert _fd_count() == base
    seqpacket.send(a, b"next")  # the connection still frames: the rest of the packet is gone
    assert seqpacket.recv(b, 64, 0) == (b"next", [])


@pytest.mark.parametrize(("sent", "max_fds"), [(3, 2), (3, 1), (1, 0)])
def test_more_fds_than_allowed_is_refused_and_all_closed(pair, pipes, sent: int, max_fds: int) -> None:
    a, b = pair
    base = _fd_count()
    seqpacket.send(a, b"fds", pipes[:sent])
    assert _refused(b, 64, max_fds).reason == "truncated control data"
    assert _fd_count() == base


def test_peer_closed(pair) -> None:
    a, b = pair
    a.close()
    error = _refused(b, 64, 4)
    assert isinstance(error, PeerClosed) and error.reason == "peer closed"


def test_credentials_are_unexpected_ancillary_data(pair, pipes) -> None:
    """SO_PASSCRED makes the kernel add SCM_CREDENTIALS to every packet: not ours to accept."""
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    base = _fd_count()
    seqpacket.send(a, b"creds")
    assert _refused(b, 64, 4).reason == "unexpected ancillary data"
    # No room for the credentials (a buffer for one fd) or for fds after them: truncated, fds closed.
    seqpacket.send(a, b"creds")
    assert _refused(b, 64, 1).reason == "truncated control data"
    seqpacket.send(a, b"creds and fds", pipes)
    assert _refused(b, 64, 4).reason == "truncated control data"
    assert _fd_count() == base


def test_recv_async_waits_for_the_packet_and_cleans_up_when_cancelled(pair, pipes) -> None:
    a, b = pair
    b.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(seqpacket.recv_async(loop, b, 64, 1), 0.05)
        loop.call_later(0.05, seqpacket.send, a, b"late", pipes[:1])
        data, fds = await asyncio.wait_for(seqpacket.recv_async(loop, b, 64, 1), 5)
        assert data == b"late" and len(fds) == 1
        seqpacket.close_fds(fds)
        a.close()
        with pytest.raises(PeerClosed):
            await asyncio.wait_for(seqpacket.recv_async(loop, b, 64, 1), 5)

    asyncio.run(main())


def test_send_async_waits_while_the_peer_is_full_and_sends_the_fds_after(pair, pipes) -> None:
    a, b = pair
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            seqpacket.send(a, b"x" * 512)
            sent += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(seqpacket.send_async(loop, a, b"last", pipes[:1]))
        await asyncio.sleep(0.05)
        assert not task.done()  # the peer's queue is full: it waits
        for _ in range(sent):
            assert seqpacket.recv(b, 1024, 0)[0] == b"x" * 512
        await asyncio.wait_for(task, 5)
        data, fds = seqpacket.recv(b, 1024, 1)
        assert data == b"last" and len(fds) == 1 and _same_file(fds[0], pipes[0])
        seqpacket.close_fds(fds)

    asyncio.run(main())


def test_connect_waits_its_turn_in_a_full_backlog_for_at_most_the_timeout(tmp_path) -> None:
    import threading
    import time

    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    queued = []
    try:
        with pytest.raises(BlockingIOError):  # what a non-blocking connect gets: the backlog is full at once
            for _ in range(10):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                queued.append(s)
                s.setblocking(False)
                s.connect(path)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            seqpacket.connect(path, 0.3)
        assert 0.25 < time.monotonic() - t0 < 3
        accept = threading.Timer(0.2, lambda: queued.append(listener.accept()[0]))
        accept.start()
        sock = seqpacket.connect(path, 5)  # room is made 0.2 s later: it gets in
        accept.join()
        assert sock.getpeername() == path and sock.gettimeout() is None
        sock.close()
    finally:
        for s in queued:
            s.close()
        listener.close()
