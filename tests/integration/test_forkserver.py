"""`ProcessSpawner` with its fork server (worker/zygote.py): real processes, no root.

The zygote runs ``tests.support.zygote_child:main`` as the stand-in worker (it reports what it
sees of itself: parent, session, fds); tests/privileged/test_e2e.py checks the real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from structlog.testing import capture_logs

from l3ptp.controller.spawner import ProcessSpawner

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZYGOTE = [sys.executable, "-m", "l3ptp.worker.zygote", "--target", "tests.support.zygote_child:main"]
CHILD = "import os, sys, time; sys.stdin.buffer.read(); open(sys.argv[1] + str(os.getpid()), 'w').write('{}'); " \
        "time.sleep(60)"


def _spawner(exits: list[tuple[int, int | None]], prefix: str, zygote: list[str] | None = None) -> ProcessSpawner:
    return ProcessSpawner(lambda pid, rc: exits.append((pid, rc)), argv=lambda net, q: [sys.executable, "-c", CHILD,
                                                                                         prefix],
                          fork_server=lambda: zygote or ZYGOTE)


async def _seen(prefix: str, pid: int) -> dict:
    for _ in range(500):
        with contextlib.suppress(OSError, ValueError):  # not there yet, or not written yet
            with open(f"{prefix}{pid}") as f:
                return json.load(f)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pid} wrote nothing")


async def _until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _on_path(monkeypatch) -> None:  # the zygote imports tests.support from the checkout
    monkeypatch.chdir(ROOT)


def test_workers_are_forked_by_the_zygote_with_only_their_stdin_and_their_exits_are_reported(tmp_path) -> None:
    prefix = str(tmp_path / "seen-")
    exits: list[tuple[int, int | None]] = []

    async def main() -> None:
        sp = _spawner(exits, prefix)
        a = await sp.spawn("n", 0, f"{prefix}\nsleep".encode())
        b = await sp.spawn("n", 1, f"{prefix}\nexit 3".encode())
        zygote = sp._server.proc.pid  # type: ignore[union-attr]
        sa, sb = await _seen(prefix, a), await _seen(prefix, b)
        for pid, seen in ((a, sa), (b, sb)):
            assert seen["ppid"] == zygote and seen["sid"] == pid == seen["pgid"]  # its own session
            assert seen["preloaded"] == ["yes"] and seen["comm"] == "l3ptp-worker" and seen["sigterm_default"]
            assert seen["dumpable"] == 1  # as an exec'd worker; its zygote is not
            # stdin (its config pipe), stdout and stderr: no socket of the zygote, no pidfd of a sibling.
            assert sorted(seen["fds"]) == ["0", "1", "2"] and seen["fds"]["0"].startswith("pipe:"), seen["fds"]
        assert sa["random"] != sb["random"] and sa["urandom"] != sb["urandom"]
        assert sa["argv"][1:] == ["--network", "n", "--queue", "0"]
        with open(f"/proc/{zygote}/comm") as f:
            assert f.read().strip() == "l3ptp-zygote"
        await _until(lambda: (b, 3) in exits, "exit 3 not reported")
        sp.signal(a, signal.SIGTERM)
        await _until(lambda: (a, -signal.SIGTERM) in exits, "SIGTERM exit not reported")
        c = await sp.spawn("n", 0, f"{prefix}\nsleep".encode())
        await _seen(prefix, c)
        await sp.kill_all()
        assert (c, -signal.SIGKILL) in exits and not _alive(zygote) and not _alive(c)
        assert sp._servers == [] and sp._procs == {}

    asyncio.run(asyncio.wait_for(main(), 40))


def test_a_released_forked_worker_outlives_its_zygote_and_is_adopted_by_the_next_spawner(tmp_path) -> None:
    """Handover: `release`, the old controller's kill_all (which ends its zygote), then the next one's `adopt`."""
    prefix = str(tmp_path / "seen-")
    exits: list[tuple[int, int | None]] = []
    later: list[tuple[int, int | None]] = []
    pids: list[int] = []

    async def main() -> None:
        sp = _spawner(exits, prefix)
        kept = await sp.spawn("n", 0, f"{prefix}\nsleep".encode())
        pids.append(kept)
        await _seen(prefix, kept)
        zygote = sp._server.proc.pid  # type: ignore[union-attr]
        sp.release({kept})
        sp.signal(kept, signal.SIGTERM)  # no longer ours: never signalled
        await sp.kill_all()
        assert exits == [] and not _alive(zygote) and _alive(kept)
        nxt = ProcessSpawner(lambda pid, rc: later.append((pid, rc)), fork_server=None)
        assert nxt.adopt(kept)
        nxt.signal(kept, signal.SIGTERM)
        await _until(lambda: later == [(kept, None)], "the adopted worker's exit not reported")
        await nxt.kill_all()

    try:
        asyncio.run(asyncio.wait_for(main(), 40))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_zygote_is_replaced_and_the_exits_of_its_orphans_still_reported(tmp_path) -> None:
    prefix = str(tmp_path / "seen-")
    exits: list[tuple[int, int | None]] = []

    async def main() -> None:
        sp = _spawner(exits, prefix)
        with capture_logs() as logs:
            orphan = await sp.spawn("n", 0, f"{prefix}\nsleep".encode())
            await _seen(prefix, orphan)
            first = sp._server
            assert first is not None and first.proc is not None
            os.kill(first.proc.pid, signal.SIGKILL)
            await _until(lambda: sp._server is None, "the lost zygote not noticed")
            assert any(e["event"] == "fork_server_lost" for e in logs)
            sp.signal(orphan, signal.SIGTERM)  # through its pidfd
            await _until(lambda: (orphan, None) in exits, "the orphan's exit not reported")
            again = await sp.spawn("n", 1, f"{prefix}\nsleep".encode())
            assert (await _seen(prefix, again))["ppid"] == sp._server.proc.pid != first.proc.pid  # type: ignore[union-attr]
        await sp.kill_all()
        assert (again, -signal.SIGKILL) in exits

    asyncio.run(asyncio.wait_for(main(), 40))


def test_without_a_zygote_workers_are_spawned_as_processes(tmp_path) -> None:
    prefix = str(tmp_path / "seen-")
    exits: list[tuple[int, int | None]] = []

    async def main() -> None:
        broken = [sys.executable, "-c", "import sys; sys.exit(1)"]  # dies before it serves
        sp = _spawner(exits, prefix, zygote=broken)
        with capture_logs() as logs:
            pids = [await sp.spawn("n", q, b"x") for q in range(7)]  # more than FORK_SERVER_STARTS_MAX
        for pid in pids:
            await _seen(prefix, pid)
            assert pid in sp._procs  # our own child
        assert any(e["event"] == "fork_server_failed" and e["fallback"] == "subprocess" for e in logs)
        assert sp._server_starts == 5 and not sp._forking()
        await sp.kill_all()
        assert sorted(p for p, _ in exits) == sorted(pids)

    asyncio.run(asyncio.wait_for(main(), 40))


def test_the_zygote_dies_with_its_controller_but_the_workers_do_not(tmp_path) -> None:
    prefix = str(tmp_path / "seen-")
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        from l3ptp.controller.spawner import ProcessSpawner
        async def main():
            sp = ProcessSpawner(lambda pid, rc: None, fork_server=lambda: {ZYGOTE!r})
            pid = await sp.spawn("n", 0, b"{prefix}\\nsleep")
            print("PIDS", sp._server.proc.pid, pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    out = tmp_path / "controller.out"
    with open(out, "w") as f:  # a file, not a pipe: the worker inherits it
        ctl = subprocess.Popen([sys.executable, "-c", script], stdout=f, cwd=ROOT)
    worker = -1
    try:
        for _ in range(1500):  # after the spawner's log lines
            pids = [line.split()[1:] for line in out.read_text().splitlines() if line.startswith("PIDS ")]
            if pids or ctl.poll() is not None:
                break
            time.sleep(0.02)
        assert pids, out.read_text()
        zygote, worker = map(int, pids[0])
        assert _alive(zygote) and _alive(worker)
        ctl.kill()  # a crash: no kill_all, no goodbye
        ctl.wait()
        for _ in range(250):
            if not _alive(zygote):
                break
            time.sleep(0.02)
        assert not _alive(zygote) and _alive(worker)
    finally:
        ctl.kill()
        ctl.wait()
        if worker > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_the_zygote_refuses_a_malformed_request_and_ends_at_eof() -> None:
    import socket

    from l3ptp.ipc import seqpacket
    from l3ptp.ipc.fork_messages import FORK_REPLIES, FORK_REQUESTS, ForkFailed, ForkWorker
    from l3ptp.worker.zygote import Zygote

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = Zygote(theirs, target=lambda: 0)
    try:
        for data in (b"\x93garbage", FORK_REQUESTS.encode(ForkWorker(network="n", queue=0))):  # no stdin fd
            seqpacket.send(ours, data)
            assert zygote._request()
            reply = FORK_REPLIES.decode_untrusted(seqpacket.recv(ours, 4096, 1)[0])
            assert isinstance(reply, ForkFailed) and reply.reason.startswith("bad request"), reply
        assert zygote.children == {}
        ours.close()
        assert not zygote._request()  # the controller is gone
    finally:
        zygote.sel.close()
        theirs.close()
