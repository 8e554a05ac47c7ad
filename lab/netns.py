"""Per-test network namespaces and helpers to run code inside them.

`netns` (a pytest fixture factory via `NetnsRegistry`) creates uniquely named
namespaces with `ip netns add` and deletes every one of them at teardown.
`run_as(fn, netns=..., uid=...)` forks, enters the namespace with setns(2),
drops to `uid`/`gid`, runs `fn()` and returns its JSON-able result (or
re-raises its error text as AssertionError). Only test-created namespaces and
198.18.0.0/16, 198.19.0.0/16, fd00::/8 addresses are ever used.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import traceback
from collections.abc import Callable
from typing import Any

from l3ptp.controller.lab import setns  # the one setns(2) wrapper (product code)


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
