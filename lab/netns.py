"""The one network-namespace toolkit of the harness (tests, demo, bench).

* `setns(name)` moves the calling (single-threaded) process into a named
  namespace; `enter(...)` is the preexec_fn the lab's processes start with
  (namespace, then uid/gid, optionally the helper's CAP_NET_ADMIN and CAP_BPF only);
* `netlink(name)` is pyroute2's netlink inside a namespace, patient with a
  loaded machine (the lab builds its hosts with it: no `ip` command);
* `NetnsRegistry` creates uniquely named namespaces with `ip netns add` for a
  test and deletes every one of them at teardown; `ip()`/`ip_json()` run
  iproute2 (test code may, product code never does);
* `run_as(fn, netns=..., uid=...)` forks, enters the namespace with setns(2),
  drops to `uid`/`gid`, runs `fn()` and returns its JSON-able result (or
  re-raises its error text as AssertionError).

Only harness-created namespaces and 198.18.0.0/16, 198.19.0.0/16, fd00::/8
addresses are ever used.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import traceback
from collections.abc import Callable
from typing import Any

from l3ptp.ipc.hardening import PR_CAP_AMBIENT, PR_CAPBSET_DROP, capset, libc, prctl

__all__ = ["NetnsRegistry", "enter", "ip", "ip_json", "netlink", "run_as", "setns"]

CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN, CAP_BPF = 12, 39
#: The helper's capabilities: netlink and TUN; loading the shared port's steering program (helper/reuseport.py).
HELPER_CAPS = (CAP_NET_ADMIN, CAP_BPF)
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT_RAISE = 2
NETLINK_CHILD_TIMEOUT = 15  # seconds; see netlink()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(netns: str) -> None:
    """Move the calling (single-threaded) process into network namespace `netns`."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc().setns(fd, CLONE_NEWNET), f"setns {netns}")
    finally:
        os.close(fd)


def netlink(netns: str) -> Any:
    """A pyroute2 `NetNS` (netlink inside `netns`), patient with a loaded machine.

    pyroute2 opens the socket in a forked child and waits 2 s for it by default;
    with both tunnel ends, iperf3 and the kernel sharing two cores that is too short.
    """
    from pyroute2 import NetNS, config

    config.default_communicate_timeout = max(config.default_communicate_timeout, NETLINK_CHILD_TIMEOUT)
    return NetNS(netns)


def enter(netns: str, uid: int | None = None, gid: int | None = None, net_admin_only: bool = False) -> Callable[[], None]:
    """A preexec_fn: enter `netns`, then become uid/gid.

    With `net_admin_only`, every capability but the helper's (HELPER_CAPS:
    CAP_NET_ADMIN and CAP_BPF) leaves the bounding set first; a non-root `uid`
    then keeps them as ambient capabilities (systemd's AmbientCapabilities=),
    while uid 0 ends up with exactly the bounding set after exec.
    """

    def run() -> None:
        setns(netns)
        if uid is None:
            return
        if net_admin_only:
            last = int(open("/proc/sys/kernel/cap_last_cap").read())
            for cap in range(last + 1):
                if cap not in HELPER_CAPS:
                    prctl(PR_CAPBSET_DROP, cap)
            prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setgid(gid if gid is not None else uid)
        os.setuid(uid)
        if net_admin_only:
            capset(sum(1 << cap for cap in HELPER_CAPS))
            if uid != 0:
                for cap in HELPER_CAPS:
                    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)

    return run


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out.stdout


def ip_json(*args: str, netns: str) -> Any:
    return json.loads(ip("-j", *args, netns=netns) or "[]")


class NetnsRegistry:
    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self) -> str:
        name = f"l3ptp-t-{secrets.token_hex(4)}"
        ip("netns", "add", name)
        self.names.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    def cleanup(self) -> None:
        for name in reversed(self.names):
            ip("netns", "del", name, check=False)
        self.names.clear()


def run_as(fn: Callable[..., Any], *, netns: str | None = None, uid: int | None = None,
           prepare: Callable[[], Any] | None = None, timeout: float = 30.0) -> Any:
    """Run `fn` in a forked child (in `netns`, as `uid`); return its result.

    With `prepare`, it runs in the namespace *before* the uid drop (for
    example to open a root-only device) and `fn` receives what it returned.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            if netns:
                setns(netns)
            prepared = prepare() if prepare is not None else None
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            payload = {"ok": fn(prepared) if prepare is not None else fn()}
        except BaseException:
            payload = {"error": traceback.format_exc()}
            code = 1
        try:
            os.write(w, json.dumps(payload).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        import select

        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError("child timed out")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "child died without a result"}')
    if "error" in result:
        raise AssertionError(result["error"])
    return result["ok"]
