"""Processes and ids the lab finds in /proc: free uids, live processes, l3ptp workers in a namespace."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets

from lab.topology import LabError

__all__ = ["DYNAMIC_ID_RANGE", "alive", "free_ids", "tun_open_to_all", "workers_in"]

#: systemd's range for dynamic users: never in /etc/passwd.
DYNAMIC_ID_RANGE = range(61184, 65520)


def tun_open_to_all() -> bool:
    """True if /dev/net/tun is read-write for everyone (Debian's udev default)."""
    try:
        return os.stat("/dev/net/tun").st_mode & 0o006 == 0o006
    except OSError:
        return False


def _running_uids() -> set[int]:
    uids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                uids.add(os.stat(f"/proc/{pid}").st_uid)
    return uids


def free_ids(count: int) -> list[int]:
    """`count` ids from the dynamic-user range with no passwd/group entry and no process."""
    import grp

    busy = _running_uids()
    out = []
    start = DYNAMIC_ID_RANGE.start + secrets.randbelow(len(DYNAMIC_ID_RANGE) - 1000)
    for n in range(start, DYNAMIC_ID_RANGE.stop):
        if n in busy:
            continue
        try:
            pwd.getpwuid(n)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(n)
            continue
        except KeyError:
            pass
        out.append(n)
        if len(out) == count:
            return out
    raise LabError("no free ids in the dynamic-user range")


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _holds_tun(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun" for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


def workers_in(netns: str, *, spares: bool = False) -> list[int]:
    """Live l3ptp worker processes inside the network namespace `netns`, from /proc; with `spares`,
    also the controller's spare while it waits for a config (``--queue -1``, holding no TUN queue yet)."""
    try:
        ns = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/net").st_ino == ns and alive(int(entry)):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if b"l3ptp.worker" in cmdline and (spares or b"\0--queue\0-1\0" not in cmdline
                                                   or _holds_tun(int(entry))):
                    out.append(int(entry))
    return sorted(out)
