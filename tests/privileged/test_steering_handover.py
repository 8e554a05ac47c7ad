"""The shared port's steering changes hands without a gap (helper/reuseport.py, "Lifetime"), on the real kernel.

A helper that dies leaves its program attached to the workers' reuseport group; the controller keeps a copy of
the map's fd and gives it to the next helper, which loads its own program on that map. Each worker's
registration then swaps the program with every socket still in the map: a queue whose worker has not
registered again yet still gets its datagrams. Without the kept map the new program's empty map refuses them
(SK_DROP, which the kernel answers with ICMP port unreachable: the peer takes it for a dead peer).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from lab.netns import ip, run_as

pytestmark = [pytest.mark.privileged]

ADDR, PORT, QUEUES = "198.18.77.1", 4433, 2


def _short_header(queue: int) -> bytes:
    """A QUIC short-header datagram whose destination CID's first byte names `queue`."""
    return bytes([0x40, queue]) + bytes(30)


@pytest.fixture
def host(netns: str) -> Iterator[str]:
    ip("addr", "add", f"{ADDR}/32", "dev", "lo", netns=netns)
    yield netns


def _group() -> list[socket.socket]:
    socks = []
    for _ in range(QUEUES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((ADDR, PORT))
        s.settimeout(1.0)
        socks.append(s)
    return socks


def _reaches(socks: list[socket.socket], queue: int) -> bool:
    """A datagram naming `queue` arrives at that queue's socket (and at no other)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(_short_header(queue), (ADDR, PORT))
    try:
        got = socks[queue].recv(100) == _short_header(queue)
    except TimeoutError:
        return False
    for other in socks:
        other.setblocking(False)
        try:
            assert other.recv(100) is None, "a datagram reached another queue's socket"
        except BlockingIOError:
            pass
        other.settimeout(1.0)
    return got


def _restarted_helper(kept: bool) -> dict[str, object]:
    from l3ptp.helper.reuseport import Steering

    socks = _group()
    old = Steering()
    map_fd, how_old = old.create("office", QUEUES)
    for queue, s in enumerate(socks):
        old.register("office", QUEUES, queue, s.fileno())
    before = [_reaches(socks, q) for q in range(QUEUES)]
    copy = os.dup(map_fd)  # what the controller holds
    old.close()  # the helper dies: only the attached program (and the controller's copy) hold the map
    new = Steering()
    _, how = new.create("office", QUEUES, copy if kept else None)
    os.close(copy)
    new.register("office", QUEUES, 0, socks[0].fileno())  # queue 0's worker registered again, queue 1's not yet
    during = [_reaches(socks, q) for q in range(QUEUES)]
    new.register("office", QUEUES, 1, socks[1].fileno())
    after = [_reaches(socks, q) for q in range(QUEUES)]
    new.close()
    for s in socks:
        s.close()
    return {"how_old": how_old, "how": how, "before": before, "during": during, "after": after}


def test_a_restarted_helper_on_the_kept_map_leaves_no_queue_unsteered(host: str) -> None:
    got = run_as(lambda: _restarted_helper(kept=True), netns=host)
    assert got["how_old"] == "new" and got["how"] == "adopted", got
    assert got["before"] == [True, True], got
    assert got["during"] == [True, True], got  # queue 1 not registered again, yet steered: the map was kept
    assert got["after"] == [True, True], got


def test_without_the_kept_map_an_unregistered_queue_is_refused_until_it_registers(host: str) -> None:
    """The fallback (the helper and the controller both restarted), and what the kept map prevents."""
    got = run_as(lambda: _restarted_helper(kept=False), netns=host)
    assert got["how"] == "new", got
    assert got["during"] == [True, False], got
    assert got["after"] == [True, True], got


def _refused(kept: object) -> str:
    from l3ptp.helper.reuseport import Steering, check_map

    socks = _group()
    other = Steering()
    wrong_size, _ = other.create("other", QUEUES + 1)
    r, w = os.pipe()
    fd = {"pipe": r, "map of 3 queues": wrong_size}[str(kept)]
    assert check_map(fd, QUEUES) is not None
    new = Steering()
    _, how = new.create("office", QUEUES, fd)
    for queue, s in enumerate(socks):
        new.register("office", QUEUES, queue, s.fileno())
    assert all(_reaches(socks, q) for q in range(QUEUES))
    for x in (r, w):
        os.close(x)
    new.close()
    other.close()
    for s in socks:
        s.close()
    return how


@pytest.mark.parametrize("kept", ["pipe", "map of 3 queues"])
def test_a_kept_fd_that_is_not_the_networks_map_is_refused_and_a_new_map_made(host: str, kept: str) -> None:
    how = run_as(lambda: _refused(kept), netns=host)
    assert how.startswith("new (the kept map was refused: not a"), how
