"""Ctrl-C and SIGTERM for the lab commands (demo, bench)."""

from __future__ import annotations

import os
import signal

__all__ = ["Interrupts"]


class Interrupts:
    """Ctrl-C and SIGTERM for the lab commands (demo, bench): a flag plus KeyboardInterrupt.

    The exception alone can be lost: raised while the interpreter runs a fork
    hook (logging's ``_releaseLock`` around a subprocess fork) it is printed
    and ignored, and the command would carry on. So commands also call
    `check()` between steps. Children forked by libraries (pyroute2's netns
    helpers) inherit the handler and simply exit.
    """

    def __init__(self) -> None:
        self.hit = False
        self._pid = os.getpid()

    def install(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:
            os._exit(128 + signum)
        self.hit = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came, even if its first exception was swallowed."""
        if self.hit:
            raise KeyboardInterrupt
