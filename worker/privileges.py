"""Drop privileges: switch user (if root), clear capabilities, no_new_privs.

Called before the worker touches the network. In every case: clear the
ambient set, set no_new_privs, drop the bounding set when allowed, capset
all of effective/permitted/inheritable to zero (unless they already are), then verify from
/proc/self/status. Any failure raises `PrivilegeError` (fatal).
"""

from __future__ import annotations

import contextlib
import os

from l3ptp.ipc.hardening import PR_CAP_AMBIENT, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, capset, prctl

__all__ = ["PrivilegeError", "drop_privileges", "read_status_caps"]

_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_LAST_FALLBACK = 40


class PrivilegeError(RuntimeError):
    pass


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
    if os.geteuid() == 0 and user:
        _switch_user(user)
    try:
        prctl(PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        raise PrivilegeError(f"clearing ambient capabilities failed: errno {exc.errno}") from None
    # Dropping the bounding set needs CAP_SETPCAP; without it, no_new_privs
    # plus empty permitted/inheritable sets already prevent regaining caps.
    for cap in range(_cap_last() + 1):
        with contextlib.suppress(OSError):
            prctl(PR_CAPBSET_DROP, cap)
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise PrivilegeError(f"PR_SET_NO_NEW_PRIVS failed: errno {exc.errno}") from None
    # Only when there is something to clear: under the controller unit
    # (empty bounding set, seccomp filter without @privileged) the sets are
    # already empty and capset(2) is refused with EPERM. Verified below either way.
    if any(read_status_caps().get(key, 1) for key in ("CapInh", "CapPrm", "CapEff")):
        try:
            capset(0)
        except OSError as exc:
            raise PrivilegeError(f"capset failed: errno {exc.errno}") from None
    status = read_status_caps()
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        if status.get(key, 1) != 0:
            raise PrivilegeError(f"{key} is {status.get(key)} after dropping capabilities")
    if status.get("NoNewPrivs") != 1:
        raise PrivilegeError("NoNewPrivs is not set")
    return status


def exit_with_parent(parent_pid: int) -> bool:
    """Ask for SIGTERM when the controller that spawned us dies.

    Called after any uid change (which clears the setting). Returns False
    when the parent is already gone (we were reparented): exit at once then.
    A worker whose controller died must not keep a tunnel nobody supervises;
    the controller-silence timeout is the second line of defence.
    """
    import signal

    prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    return os.getppid() == parent_pid
