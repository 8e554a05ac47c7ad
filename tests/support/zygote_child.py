"""A stand-in worker for the fork server tests (``--target tests.support.zygote_child:main``).

Its stdin is ``<path prefix>\\n<command>``: it writes what it sees of itself (parent, session,
open fds and what they are, the str hash seed check, a random number) as JSON to
``<prefix><pid>``, then runs `command`: ``exit N`` exits with N, ``sleep`` waits for a signal.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import time

PRELOADED: list[str] = []


def preload() -> None:
    PRELOADED.append("yes")


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own fd, gone already
    return out


def main() -> int:
    prefix, _, command = sys.stdin.buffer.read().decode().partition("\n")
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    seen = {"ppid": os.getppid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "fds": _fds(), "comm": comm,
            "preloaded": PRELOADED, "random": random.random(), "urandom": os.urandom(8).hex(),
            "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "argv": sys.argv,
            "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)}  # PR_GET_DUMPABLE
    tmp = f"{prefix}{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(seen, f)
    os.rename(tmp, f"{prefix}{os.getpid()}")
    if command.startswith("exit "):
        return int(command.split()[1])
    time.sleep(60)
    return 0
