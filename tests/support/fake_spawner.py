"""A fake `Spawner`: records spawns and signals, lets tests decide exits.

Each spawn gets a new fake pid and decodes the worker's stdin with
`WORKER_CONFIG.decode_untrusted`, so tests see exactly what a worker would.
SIGTERM/SIGKILL make the fake process exit at once (``exit_on_signal``);
`crash(pid)` simulates a crash. Exits are reported through the same
`on_exit(pid, returncode)` callback as the real spawner, from the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal

from l3ptp.controller.spawner import ExitCallback
from l3ptp.ipc.control_messages import WORKER_CONFIG, WorkerConfig


@dataclasses.dataclass
class FakeProcess:
    pid: int
    network: str
    queue: int
    config: WorkerConfig
    signals: list[int] = dataclasses.field(default_factory=list)
    returncode: int | None = None


class FakeSpawner:
    def __init__(self, on_exit: ExitCallback, *, exit_on_signal: bool = True) -> None:
        self._on_exit = on_exit
        self.exit_on_signal = exit_on_signal
        self.processes: dict[int, FakeProcess] = {}
        self.fail_next: OSError | None = None
        #: pids taken over with `adopt` (workers of an earlier controller) and the signals they got.
        self.adopted: dict[int, list[int]] = {}
        self._pids = itertools.count(40000)
        #: pids let go at an orderly stop (`release`): never signalled afterwards.
        self.released: set[int] = set()

    async def spawn(self, network: str, queue: int, stdin_data: bytes) -> int:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        config = WORKER_CONFIG.decode_untrusted(stdin_data)
        assert isinstance(config, WorkerConfig)
        pid = next(self._pids)
        self.processes[pid] = FakeProcess(pid, network, queue, config)
        return pid

    def adopt(self, pid: int) -> bool:
        if pid in self.processes or pid in self.adopted:
            return False
        self.adopted[pid] = []
        return True

    def signal(self, pid: int, sig: int) -> None:
        if pid in self.released:
            raise AssertionError(f"signalled released worker {pid}")
        if pid in self.adopted:
            self.adopted[pid].append(sig)
            if self.exit_on_signal and sig in (signal.SIGTERM, signal.SIGKILL):
                asyncio.get_running_loop().call_soon(self._on_exit, pid, None)
            return
        proc = self.processes.get(pid)
        if proc is None or proc.returncode is not None:
            return
        proc.signals.append(sig)
        if self.exit_on_signal and sig in (signal.SIGTERM, signal.SIGKILL):
            self.crash(pid, -sig)

    def crash(self, pid: int, returncode: int = 1) -> None:
        proc = self.processes[pid]
        if proc.returncode is not None:
            return
        proc.returncode = returncode
        asyncio.get_running_loop().call_soon(self._on_exit, pid, returncode)

    def live_pids(self) -> set[int]:
        return {p.pid for p in self.processes.values() if p.returncode is None and p.pid not in self.released}

    def live(self, network: str | None = None) -> list[FakeProcess]:
        return [
            p
            for p in self.processes.values()
            if p.returncode is None and (network is None or p.network == network)
        ]

    def release(self, pids: set[int]) -> None:
        """Handover: forget `pids` without signalling them (they stay live, in `released`)."""
        self.released |= set(pids)
        for pid in pids:
            self.adopted.pop(pid, None)

    async def kill_all(self) -> None:
        for pid in list(self.live_pids()):  # not the released ones
            self.crash(pid, -signal.SIGKILL)
        await asyncio.sleep(0)
