"""prctl(2) for every l3ptp process, through ctypes (no capability needed).

`harden_process` is what the helper and the controller do first:
PR_SET_NO_NEW_PRIVS=1 (survives fork and execve, so nothing they start can
gain privilege; the workers set it again themselves) and PR_SET_DUMPABLE=0
(no core file with keys; other processes of the same user can neither ptrace
them nor read their /proc/<pid>/mem, environ or fds).
"""

from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["PR_CAPBSET_DROP", "PR_CAP_AMBIENT", "PR_SET_DUMPABLE", "PR_SET_NO_NEW_PRIVS", "PR_SET_PDEATHSIG",
           "capset", "harden_process", "libc", "prctl"]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process, with errno kept for `ctypes.get_errno`."""
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    """prctl(2); raises OSError (with errno) if the kernel refuses."""
    args = [ctypes.c_ulong(a) for a in (option, arg2, arg3, arg4, arg5)]
    if libc().prctl(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}) failed: {os.strerror(err)}")


def capset(mask: int) -> None:
    """capset(2): effective, permitted and inheritable all `mask` (capabilities 0..63: CAP_BPF is 39);
    raises OSError (with errno) if the kernel refuses."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = data[i].permitted = data[i].inheritable = (mask >> (32 * i)) & 0xFFFFFFFF
    if libc().capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset failed: {os.strerror(err)}")


def harden_process() -> None:
    """PR_SET_NO_NEW_PRIVS=1 and PR_SET_DUMPABLE=0 for this process (see the module doc)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
