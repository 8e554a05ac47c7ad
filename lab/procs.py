"""Processes and ids the lab finds in /proc: free uids, live processes, l3ptp workers in a namespace."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets

import psutil

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
    """Every uid (real, effective, saved) some process runs with now."""
    uids: set[int] = set()
    for proc in psutil.process_iter(["uids"]):
        if proc.info["uids"] is not None:
            uids.update(proc.info["uids"])
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
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _holds_tun(pid: int) -> bool:
    # psutil's open_files() lists regular files only; /dev/net/tun is a character device.
    with contextlib.suppress(OSError):
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun" for fd in os.listdir(f"/proc/{pid}/fd"))
    return False


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def workers_in(netns: str, *, spares: bool = False) -> list[int]:
    """Live l3ptp worker processes inside the network namespace `netns`, from /proc; with `spares`,
    also the controller's spare while it waits for a config (``--queue -1``, holding no TUN queue yet)
    and its fork server (``l3ptp-zygote``; the workers it forks are ``l3ptp-worker``)."""
    try:
        ns = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not any("l3ptp.worker" in arg for arg in cmdline):
            continue
        with contextlib.suppress(OSError):  # psutil gives no namespaces: the ns link's inode says which
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns and alive(proc.pid):
                # The fork server, from its exec on (it names itself l3ptp-zygote only once it runs); the
                # workers it forks have its cmdline too, and name themselves l3ptp-worker at once.
                zygote = any("l3ptp.worker.zygote" in arg for arg in cmdline) and _comm(proc.pid) != "l3ptp-worker"
                spare = zygote or any(a == "--queue" and b == "-1" for a, b in zip(cmdline, cmdline[1:]))
                if spares or not spare or _holds_tun(proc.pid):
                    out.append(proc.pid)
    return sorted(out)
