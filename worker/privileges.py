"""Drop privileges: switch user (if root), clear capabilities, no_new_privs.

Called before the worker touches the network. In every case: clear the
ambient set, set no_new_privs, drop the bounding set when allowed, capset
all of effective/permitted/inheritable to zero, then verify from
/proc/self/status. Any failure raises `PrivilegeError` (fatal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["PrivilegeError", "drop_privileges", "read_status_caps"]

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_FALLBACK = 40


class PrivilegeError(RuntimeError):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: ctypes.CDLL, *args: int) -> int:
    return libc.prctl(*[ctypes.c_ulong(a) for a in args])


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return _CAP_LAST_FALLBACK


def read_status_caps() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb and NoNewPrivs from /proc/self/status."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                out[key] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                out[key] = int(value.strip())
    return out


def _switch_user(user: str) -> None:
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"unknown user {user!r}") from None
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise PrivilegeError("setuid did not take effect")


def drop_privileges(user: str = "") -> dict[str, int]:
    """Drop everything; return the verified /proc/self/status values."""
    libc = _libc()
    if os.geteuid() == 0 and user:
        _switch_user(user)
    if _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise PrivilegeError(f"clearing ambient capabilities failed: errno {ctypes.get_errno()}")
    # Dropping the bounding set needs CAP_SETPCAP; without it, no_new_privs
    # plus empty permitted/inheritable sets already prevent regaining caps.
    for cap in range(_cap_last() + 1):
        _prctl(libc, _PR_CAPBSET_DROP, cap, 0, 0, 0)
    if _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"PR_SET_NO_NEW_PRIVS failed: errno {ctypes.get_errno()}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise PrivilegeError(f"capset failed: errno {ctypes.get_errno()}")
    status = read_status_caps()
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        if status.get(key, 1) != 0:
            raise PrivilegeError(f"{key} is {status.get(key)} after dropping capabilities")
    if status.get("NoNewPrivs") != 1:
        raise PrivilegeError("NoNewPrivs is not set")
    return status


PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int) -> bool:
    """Ask for SIGTERM when the controller that spawned us dies.

    Called after any uid change (which clears the setting). Returns False
    when the parent is already gone (we were reparented): exit at once then.
    A worker whose controller died must not keep a tunnel nobody supervises;
    the controller-silence timeout is the second line of defence.
    """
    import signal

    libc = _libc()
    if _prctl(libc, PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return os.getppid() == parent_pid
