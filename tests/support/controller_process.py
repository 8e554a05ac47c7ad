"""Run a real `l3ptp-controller` process (and its real workers) without root.

* `FakeHelperThread`: a `FakeHelper(tuns=True)` serving a helper socket path
  from its own thread and event loop. Workers claim fake TUN queues
  (socketpairs) from it; the test plays the kernel on
  ``helper.tun(network, queue).host``.
* `ControllerProcess`: ``python -m l3ptp.controller --config PATH`` with
  stdout/stderr to a log file (never a pipe: the workers inherit them and a
  full pipe would block them), the real CLI (`l3ptp.controller.cli.main`)
  against its control socket, and cleanup that kills only what it started.
* `write_toml`: a configuration written as TOML (tomli-w).
* `pid_alive`: whether /proc/<pid> exists (and is not a zombie).

Every wait is bounded; a failed wait raises AssertionError with the log tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import tomli_w

from l3ptp.controller import cli
from l3ptp.worker import keys

from .fake_helper import FakeHelper
from .fake_tun import FakeTun

__all__ = [
    "ControllerProcess",
    "FakeHelperThread",
    "free_udp_port",
    "new_key_file",
    "pid_alive",
    "proc_status",
    "wait_until",
    "write_toml",
]


# ---- small helpers -----------------------------------------------------------------


def write_toml(path: str, data: dict[str, Any]) -> None:
    """Write nested dicts of str/int/float/bool/lists as TOML (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(tomli_w.dumps(data))
    os.replace(tmp, path)


def new_key_file(path: str) -> str:
    """A fresh node key at `path` (0600); returns its fingerprint."""
    key = keys.generate_private_key()
    keys.save_private_key(key, path)
    return keys.fingerprint(key)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict ({} if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def pid_alive(pid: int) -> bool:
    """True while /proc/<pid> exists and is not a zombie."""
    state = proc_status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


def wait_until(cond: Callable[[], Any], timeout: float, what: str, log: Callable[[], str] | None = None,
               every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- log tail ---\n{log()}" if log is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        time.sleep(every)


# ---- the fake helper in a thread ------------------------------------------------------------


class FakeHelperThread:
    """`FakeHelper(tuns=True)` listening on `path`, in a background event loop."""

    def __init__(self, path: str, uid: int | None = None) -> None:
        self.path = path
        self.helper = FakeHelper(uid=os.getuid() if uid is None else uid, tuns=True)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-helper", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.helper.serve_path(self.path))
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> FakeHelperThread:
        self._thread.start()
        if not self._ready.wait(5):
            raise AssertionError("fake helper did not start")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the helper's loop (consistent view of its state)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def networks(self) -> list[str]:
        return list(self.call(lambda: list(self.helper.networks)))

    def tun(self, network: str, queue: int = 0) -> FakeTun:
        return self.call(lambda: self.helper.networks[network].tuns[queue])

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.helper.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


# ---- the controller process -------------------------------------------------------------------


class ControllerProcess:
    """One real controller process with its own runtime dir, config and log."""

    def __init__(self, config_path: str, runtime_dir: str, log_path: str) -> None:
        self.config_path = config_path
        self.runtime_dir = runtime_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        #: Every worker pid this controller was seen to run (for the leak check).
        self.seen_pids: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ControllerProcess:
        env = dict(os.environ, L3PTP_LOG_FORMAT="json")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "l3ptp.controller", "--config", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def events(self, name: str) -> list[dict[str, Any]]:
        """JSON log lines (controller and workers) whose event is `name`."""
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("event") == name:
                    out.append(obj)
        return out

    def cli(self, *argv: str, timeout: float = 3.0) -> tuple[int, str, str]:
        """The real `l3ptp` CLI code against this controller's control socket."""
        out, err = io.StringIO(), io.StringIO()
        rc = cli.main(["--runtime-dir", self.runtime_dir, "--timeout", str(timeout), *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def status(self) -> dict[str, Any] | None:
        """`l3ptp status --json` as a dict, None if not answering (yet)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"controller exited with {self.proc.returncode}\n{self.log_tail()}")
        if not os.path.exists(os.path.join(self.runtime_dir, "control.sock")):
            return None
        rc, out, _ = self.cli("status", "--json")
        if rc != 0:
            return None
        data: dict[str, Any] = json.loads(out)
        for net in data["networks"]:
            self.seen_pids.update(q["pid"] for q in net["queues"] if q["pid"])
        return data

    def network(self, name: str) -> dict[str, Any] | None:
        data = self.status()
        if data is None:
            return None
        return next((n for n in data["networks"] if n["name"] == name), None)

    def wait_status(self, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            data = self.status()
            return data if data is not None and cond(data) else None

        return wait_until(check, timeout, what, self.log_tail)  # type: ignore[no-any-return]

    def wait_network(self, name: str, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        data = self.wait_status(
            lambda d: any(n["name"] == name and cond(n) for n in d["networks"]), timeout, f"{name}: {what}"
        )
        return next(n for n in data["networks"] if n["name"] == name)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"controller did not exit after SIGTERM\n{self.log_tail()}") from None

    def cleanup(self) -> None:
        """Kill this controller (if still running) and then its own children, by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = _children(self.proc.pid)
        self.proc.kill()
        self.proc.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _children(parent: int) -> list[int]:
    """Pids whose parent is `parent` (read while the parent is alive, so they are its own)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_status(int(entry)).get("PPid") == str(parent):
            out.append(int(entry))
    return out


def as_user(uid: int, gid: int, fn: Callable[[], str], groups: Sequence[int] = ()) -> str:
    """Run `fn` in a forked child as uid/gid with supplementary `groups`; return its output."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_end, fn().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        result = fh.read()
    os.waitpid(pid, 0)
    return result
