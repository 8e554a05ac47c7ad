"""What the parts of the benchmark share: its error, its progress lines, Ctrl-C checkpoints, sizes."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["TUNNEL_MTU", "UDP_LEN", "BenchError", "checkpoint", "say"]

TUNNEL_MTU = 1280  # l3ptp's; the baselines' tunnels get the same inner MTU
UDP_LEN = 1200


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def say(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", flush=True)


#: Installed by runner.main(); `checkpoint()` between steps.
interrupts: Any = None


def checkpoint() -> None:
    """Stop at the next step after Ctrl-C/SIGTERM, even if its exception was swallowed."""
    if interrupts is not None:
        interrupts.check()
