"""`ProcessSpawner` with real processes: the spare started ahead, adopted pids watched through a pidfd."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from l3ptp.controller.spawner import ProcessSpawner

pytestmark = pytest.mark.timeout(60)

# A stand-in worker: imports nothing, echoes its stdin to a file named after its pid, then waits.
CHILD = "import os, sys, time; d = sys.stdin.buffer.read(); open(sys.argv[1] + str(os.getpid()), 'wb').write(d); " \
        "time.sleep(60)"


def _live_pids(sp: ProcessSpawner) -> set[int]:
    """The pids the spawner still owns (its own children and the adopted ones)."""
    return set(sp._procs) | set(sp._adopted) | {pid for fs in sp._servers for pid in fs.children}


def test_a_spare_takes_the_next_spawn_and_is_ended_with_the_rest(tmp_path) -> None:
    prefix = str(tmp_path / "got-")
    exits: list[tuple[int, int | None]] = []

    async def main() -> None:
        sp = ProcessSpawner(lambda pid, rc: exits.append((pid, rc)),
                            argv=lambda net, q: [sys.executable, "-c", CHILD, prefix], fork_server=None)
        first = await sp.spawn("n", 0, b"config 0")
        for _ in range(200):  # the spare is being started
            if sp._spare is not None:
                break
            await asyncio.sleep(0.02)
        spare = sp._spare
        assert spare is not None and spare.returncode is None
        second = await sp.spawn("n", 1, b"config 1")
        assert second == spare.pid  # handed the config, not a fresh interpreter
        for _ in range(500):  # each child writes what it read
            if os.path.exists(prefix + str(second)) and os.path.exists(prefix + str(first)):
                break
            await asyncio.sleep(0.02)
        with open(prefix + str(second), "rb") as f:
            assert f.read() == b"config 1"
        with open(prefix + str(first), "rb") as f:
            assert f.read() == b"config 0"
        for _ in range(500):  # the next spare starts
            if sp._spare is not None:
                break
            await asyncio.sleep(0.02)
        left = sp._spare
        assert left is not None
        await sp.kill_all()
        assert left.returncode is not None and _live_pids(sp) == set()
        assert sorted(pid for pid, _ in exits) == sorted([first, second])

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_adopted_pid_is_signalled_and_its_exit_reported() -> None:
    exits: list[tuple[int, int | None]] = []

    async def main() -> None:
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not its child
        try:
            sp = ProcessSpawner(lambda pid, rc: exits.append((pid, rc)),
                                argv=lambda net, q: [sys.executable, "-c", CHILD, "/nonexistent/"], fork_server=None)
            assert sp.adopt(other.pid) and not sp.adopt(other.pid)
            assert other.pid in _live_pids(sp)
            sp.signal(other.pid, signal.SIGTERM)
            for _ in range(250):
                if exits:
                    break
                await asyncio.sleep(0.02)
            assert exits == [(other.pid, None)] and _live_pids(sp) == set()
            assert not sp.adopt(other.pid + 10_000_000)  # no such process
            await sp.kill_all()
        finally:
            other.kill()
            other.wait()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_released_child_outlives_the_spawner_and_its_event_loop(tmp_path) -> None:
    """Handover: `release` forgets a child without killing it, also when kill_all runs, the event loop
    closes and the transport is collected (asyncio kills a running child whose transport is closed)."""
    import gc

    prefix = str(tmp_path / "got-")
    exits: list[tuple[int, int | None]] = []
    kept: list[int] = []

    async def main() -> None:
        sp = ProcessSpawner(lambda pid, rc: exits.append((pid, rc)),
                            argv=lambda net, q: [sys.executable, "-c", CHILD, prefix], fork_server=None)
        released = await sp.spawn("n", 0, b"config 0")
        other = await sp.spawn("n", 1, b"config 1")
        kept.append(released)
        sp.release({released})
        assert _live_pids(sp) == {other}
        await sp.kill_all()
        assert [pid for pid, _ in exits] == [other]

    asyncio.run(asyncio.wait_for(main(), 30))
    gc.collect()
    try:
        os.kill(kept[0], 0)  # still running
        with open(f"/proc/{kept[0]}/stat") as f:
            assert f.read().rsplit(") ", 1)[1][0] != "Z"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(kept[0], signal.SIGKILL)
        with __import__("contextlib").suppress(ChildProcessError):
            os.waitpid(kept[0], 0)
