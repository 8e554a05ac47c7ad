"""`make demo` as a user runs it: the whole command, and Ctrl-C in the middle of it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.controller_process import pid_alive

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]  # `lab` is the checkout's harness, run from its top


def _demo(**kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lab.demo", "--seconds", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)  # type: ignore[call-overload]


def _left_behind(tag: str, pids: list[int]) -> list[str]:
    left = [f"netns {n}" for n in os.listdir("/run/netns") if tag in n] if os.path.isdir("/run/netns") else []
    return left + [f"pid {pid}" for pid in pids if pid_alive(pid)]


def test_demo_runs_and_prints_status_of_both_ends_with_traffic() -> None:
    proc = _demo()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert out.count("$ l3ptp status") == 2 and out.count("state: up") == 2, out
    received = [int(n) for n in re.findall(r"transfer: .*? received \((\d+) packets\)", out)]
    assert len(received) == 2 and all(n > 0 for n in received), out
    assert "cleanup complete" in out and "demo finished successfully" in out
    tag = re.search(r"namespaces l3ptp-(\w+)-a", out).group(1)  # type: ignore[union-attr]
    assert _left_behind(tag, []) == []


def test_ctrl_c_mid_demo_cleans_up_everything() -> None:
    proc = _demo(start_new_session=True)
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "tunnel established" in line:
            break
    text = "".join(lines)
    assert "tunnel established" in text, text
    tag = re.search(r"namespaces l3ptp-(\w+)-a", text).group(1)  # type: ignore[union-attr]
    pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
    pids += [int(p) for group in re.findall(r"workers: a=\[([\d, ]*)\], b=\[([\d, ]*)\]", text) for g in group
             for p in g.split(",") if p.strip()]
    assert len(pids) >= 8  # 2 helpers, 2 controllers, 4 workers
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text + rest
    assert "interrupted" in rest and "cleanup complete" in rest, rest
    assert _left_behind(tag, pids) == []
