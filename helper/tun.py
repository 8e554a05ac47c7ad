"""Multi-queue TUN creation; the only file that knows TUN ioctl numbers.

Queue 0 is created with IFF_TUN_EXCL, so a device somebody else created
(same name) fails with EBUSY instead of being adopted. TUNSETOWNER to the
helper's own euid follows at once: an ownerless multi-queue TUN can be
joined by any local user, an owned one only by its owner or CAP_NET_ADMIN.
Further queues attach by name. The returned fds are close-on-exec dups.
"""

from __future__ import annotations

import fcntl
import os

import pytun

TUNSETOWNER = 0x400454CC
FLAGS = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_MULTI_QUEUE


def _open(ifname: str, flags: int) -> int:
    dev = pytun.TunTapDevice(name=ifname, flags=flags)
    try:
        return os.dup(dev.fileno())
    finally:
        dev.close()


def open_queues(ifname: str, queues: int, owner_uid: int) -> list[int]:
    """Create `ifname` with `queues` queues; raise OSError (EBUSY if it exists)."""
    fds = [_open(ifname, FLAGS | pytun.IFF_TUN_EXCL)]
    try:
        fcntl.ioctl(fds[0], TUNSETOWNER, owner_uid)
        for _ in range(1, queues):
            fds.append(_open(ifname, FLAGS))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
