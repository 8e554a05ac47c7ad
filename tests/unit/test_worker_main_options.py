"""Worker start-up options: event loop choice and CPU pinning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from l3ptp.ipc.control_messages import EventLoop
from l3ptp.worker.__main__ import loop_factory


def test_asyncio_and_auto_mean_plain_asyncio() -> None:
    assert loop_factory(EventLoop.ASYNCIO) is None
    assert loop_factory(EventLoop.AUTO) is None


def test_uvloop_when_asked() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory(EventLoop.UVLOOP) is uvloop.new_event_loop


def test_explicit_uvloop_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import fails
    with pytest.raises(ImportError):
        loop_factory(EventLoop.UVLOOP)


def _affinity_after_pin(cpu: int) -> subprocess.CompletedProcess[str]:
    code = f"import os; from l3ptp.worker.__main__ import pin_cpu; pin_cpu({cpu}); print(sorted(os.sched_getaffinity(0)))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_pin_cpu_pins_and_minus_one_leaves_alone() -> None:
    cpu = max(os.sched_getaffinity(0))
    assert _affinity_after_pin(cpu).stdout.strip() == f"[{cpu}]"
    assert _affinity_after_pin(-1).stdout.strip() == str(sorted(os.sched_getaffinity(0)))


def test_pin_to_a_missing_cpu_fails_clearly() -> None:
    res = _affinity_after_pin(4095)
    assert res.returncode != 0 and "Invalid argument" in res.stderr
