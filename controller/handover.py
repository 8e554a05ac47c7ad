"""Handing the workers over to the next controller, and adopting those of the previous one.

Shell. An orderly stop (SIGTERM/SIGINT: `systemctl stop` or `restart`) does
not stop the running workers: each one on the bus gets `Handover(grace)`, is
released by the spawner (never signalled) and keeps carrying traffic; the
``handover`` marker in the runtime directory tells the next controller to
collect them. A worker no controller speaks to within HANDOVER_GRACE closes
its session and exits.

At start, after a handover (the marker, at most HANDOVER_MARKER_MAX_AGE old)
or a crash (the bus socket left behind), the survivors report on the bus by
themselves; they are waited for (at most ADOPT_WAIT_INTERVALS status
intervals) and adopted by pidfd as their networks come up. A survivor heard
later is adopted when its queue has no live worker, else told to Shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import structlog

from l3ptp.controller.supervision import WorkerState
from l3ptp.ipc.constants import HANDOVER_GRACE
from l3ptp.ipc.control_messages import Handover as HandoverMessage
from l3ptp.ipc.control_messages import Shutdown, WorkerHello, WorkerStatus

if TYPE_CHECKING:
    from l3ptp.controller.app import Controller
    from l3ptp.controller.networks import NetworkRuntime

__all__ = ["ADOPT_WAIT_INTERVALS", "HANDOVER_MARKER", "HANDOVER_MARKER_MAX_AGE", "Handover"]

#: Left in the runtime directory by an orderly stop that handed its workers over:
#: the next controller collects them. Its age bounds it (HANDOVER_MARKER_MAX_AGE).
HANDOVER_MARKER = "handover"
#: After this many seconds every handed-over worker has exited (grace plus slack):
#: an older marker is ignored.
HANDOVER_MARKER_MAX_AGE = HANDOVER_GRACE + 5.0
#: At start, how many status intervals to wait for the workers of a network
#: the helper still has (they outlived the previous controller) to report.
ADOPT_WAIT_INTERVALS = 2.5

log = structlog.get_logger("l3ptp.controller")


class Handover:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    @property
    def marker_path(self) -> str:
        return os.path.join(self.ctl.runtime_dir, HANDOVER_MARKER)

    def take_marker(self) -> bool:
        """True if the previous controller handed its workers over recently; the marker is removed."""
        try:
            age = time.time() - os.stat(self.marker_path).st_mtime
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.marker_path)
        fresh = -5.0 <= age <= HANDOVER_MARKER_MAX_AGE
        log.info("handover_marker_found", age=round(age, 3), collect=fresh)
        return fresh

    async def hand_over(self) -> set[int]:
        """Send `Handover(HANDOVER_GRACE)` to every running worker on the bus, leave the marker and release
        them (the spawner forgets them); returns their pids. Their slots are still to be handed over."""
        ctl = self.ctl
        handed: set[int] = set()
        release = getattr(ctl.spawner, "release", None)
        if release is not None and ctl.bus is not None:
            for rt in ctl.networks.values():
                for slot in rt.sup.slots:
                    ident = rt.idents.get(slot.queue)
                    if slot.pid is not None and ident is not None and slot.state is WorkerState.RUNNING:
                        handed.add(slot.pid)
            if handed:
                with contextlib.suppress(OSError):
                    with open(self.marker_path, "w") as f:
                        f.write(f"{os.getpid()}\n")
                for rt in ctl.networks.values():
                    for slot in rt.sup.slots:
                        if slot.pid in handed:
                            await ctl.bus.send(rt.idents.pop(slot.queue), HandoverMessage(grace=HANDOVER_GRACE))
                            log.info("worker_handed_over", network=rt.net.name, queue=slot.queue, pid=slot.pid)
                release(handed)
        return handed

    async def collect_survivors(self, present: dict[str, Any], *, predecessor_crashed: bool,
                                handed_over: bool) -> dict[str, dict[int, tuple[int, bytes]]]:
        """Workers of `present` networks that outlived the previous controller: name -> queue -> (pid, ident).

        Only after a crash or a handover (see `Controller.run`). They reconnect to the bus by themselves and
        say WorkerStatus every status_interval; wait for that (at most ADOPT_WAIT_INTERVALS status
        intervals, less once every queue has been heard)."""
        ctl = self.ctl
        found: dict[str, dict[int, tuple[int, bytes]]] = {}
        want = {(n.name, q) for n in ctl.config.networks if n.name in present for q in range(n.queues)}
        if not (predecessor_crashed or handed_over):
            return found
        deadline = ctl.clock() + ADOPT_WAIT_INTERVALS * ctl.config.controller.status_interval
        while want and ctl.bus is not None and (left := deadline - ctl.clock()) > 0:
            try:
                got = await asyncio.wait_for(ctl.bus.recv(), left)
            except TimeoutError:
                break
            if got is not None and isinstance(got[1], WorkerHello | WorkerStatus) \
                    and (got[1].network, got[1].queue) in want:
                want.discard((got[1].network, got[1].queue))
                found.setdefault(got[1].network, {})[got[1].queue] = (got[1].pid, got[0])
        return found

    async def adopt_survivors(self, rt: NetworkRuntime, survivors: dict[int, tuple[int, bytes]]) -> None:
        """Take over the survivors (queue -> (pid, ident)) of a network coming up, before it starts (its
        tickets just made: a re-registration uses them)."""
        adopt = getattr(self.ctl.spawner, "adopt", None)
        adopted = []
        for queue, (pid, ident) in sorted(survivors.items()):
            if adopt is not None and adopt(pid):
                rt.sup.adopt(queue, pid, self.ctl.clock())
                rt.idents[queue] = ident
                adopted.append(queue)
                log.info("worker_adopted", network=rt.net.name, queue=queue, pid=pid)
                await self.ctl.worker_bus.advertise(rt, queue)  # and it repeats the peer's routes for us
        if adopted and rt.shares_port():  # into the helper's steering map (a new one if it lost ours)
            await self.ctl.lifecycle.reregister_queues(rt, adopted, fresh=True)

    async def late_survivor(self, rt: NetworkRuntime, ident: bytes, msg: WorkerHello | WorkerStatus) -> None:
        """A worker this controller does not know reports for a configured queue: a survivor of the
        previous controller heard after the adoption wait (or after a stop that left no marker).

        Adopted (by pidfd) when its queue has no live worker, e.g. the restart is still pending or the
        spawned replacement failed (it could not bind the port the survivor holds); otherwise told to
        Shutdown (it closes its session and exits), at most once per pid. Never fails the network."""
        ctl = self.ctl
        queue, pid = msg.queue, msg.pid
        if pid in ctl.lifecycle.recently_exited:
            return  # a report of ours still queued when it exited (never adopt a reused pid)
        adopt = getattr(ctl.spawner, "adopt", None)
        if rt.sup.can_adopt(queue) and adopt is not None and adopt(pid):
            rt.sup.adopt(queue, pid, ctl.clock())
            rt.idents[queue] = ident
            if isinstance(msg, WorkerStatus):
                rt.reports[queue] = msg
            rt.routes.reset_queue(queue)
            log.info("worker_adopted", network=rt.net.name, queue=queue, pid=pid, late=True)
            await ctl.worker_bus.advertise(rt, queue)  # and it repeats the peer's routes for us
            if rt.shares_port():
                await ctl.lifecycle.reregister_queues(rt, [queue])
            return
        if pid in rt.refused_late:
            return
        if len(rt.refused_late) >= 64:
            rt.refused_late.clear()
        rt.refused_late.add(pid)
        log.warning("late_worker_refused", network=rt.net.name, queue=queue, pid=pid,
                    reason="its queue has a worker" if not rt.sup.can_adopt(queue) else "not adoptable")
        await ctl.worker_bus.send(ident, Shutdown(reason="another worker serves this queue"))
