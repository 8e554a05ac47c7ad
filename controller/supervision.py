"""Worker supervision: one state machine per worker, one supervisor per network.

Theory of operation
-------------------
A network with N queues has N workers. Each worker slot (queue) moves through
the states of `WorkerState`; every allowed move is listed in `_TRANSITIONS`
and anything else raises `SupervisionError` (h11's `_assertInState`).

::

    STOPPED --start--> STARTING --hello/status--> RUNNING
       ^                  |  \\                      |
       |                  |   `-----exit------------+--> BACKOFF --due--> STARTING
       |                stop                        |       |
       |                  v                       stop     stop / give up
       `---exit------- STOPPING <-------------------'       v
                                                          STOPPED / FATAL

The module is pure (sans-I/O): it never spawns, signals or sleeps. Callers
feed it events with the current time (``now``, from an injected clock) and
carry out the `Action` values it returns: `Spawn`, `Terminate` (send the
worker `Shutdown` and SIGTERM), `Kill` (SIGKILL), `NetworkFailed`. They call
`NetworkSupervisor.tick` at `next_deadline()` at the latest.

Rules
-----
* Restart after an unexpected exit is immediate for the first crash of a
  queue within the last ``RESTART_WINDOW`` seconds and waits
  ``RESTART_BACKOFF_MIN * 2**(n-2)`` seconds, capped at
  ``RESTART_BACKOFF_MAX``, for the n-th (n >= 2). So a worker that crashes
  at once is never restarted in a tight loop.
* A worker that ran ``RESTART_STABLE`` seconds or more before it exited was
  started successfully: the queue's crash history (and its history of remote
  exits) is forgotten first, so that exit is a first crash, restarted at
  once. Killing a healthy worker (kill -9, the OOM killer) never delays its
  replacement; only workers that die young (or were killed for silence)
  build up the delay and FAILED.
* The ``RESTART_MAX_IN_WINDOW``-th crash of one queue within
  ``RESTART_WINDOW`` marks the whole network FAILED (with the reason) and
  stops its other workers; so does a worker's ``fatal`` exit (a restart
  cannot help: bad ticket, bad key, refused config). A failed network stays
  failed until it is started again (``up``, reload with a change, restart).
* Not a crash: an exit the worker announced as ``remote``
  (`WorkerExiting.remote`: it ended on input from the network, what a peer
  or a stranger sent). It is restarted after the same growing delay
  (counted apart, in ``remote_exits``) but never fails the network: a
  remote party alone cannot put a network into FAILED, which is for local
  faults an operator must fix.
* The reason a worker gave when it ended (`on_exiting`) is kept as the
  slot's ``last_error`` with the exit status, so status says why.
* A STARTING or RUNNING worker that has sent nothing (hello or status) for
  more than ``WORKER_STATUS_TIMEOUT`` is dead: it is killed once, and its
  exit then counts as a crash.
* A worker asked to stop gets ``STOP_GRACE`` seconds after `Terminate`
  before `Kill`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Iterable
from typing import Final

from l3ptp.ipc.constants import (
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    RESTART_MAX_IN_WINDOW,
    RESTART_STABLE,
    RESTART_WINDOW,
    STOP_GRACE,
    WORKER_STATUS_TIMEOUT,
)

__all__ = [
    "STOP_GRACE",
    "Action",
    "Kill",
    "NetworkFailed",
    "NetworkSupervisor",
    "Spawn",
    "SupervisionError",
    "Terminate",
    "WorkerSlot",
    "WorkerState",
    "backoff_delay",
]

class SupervisionError(Exception):
    """A transition not in the table: a bug in the caller, never bad input."""


class WorkerState(enum.Enum):
    STOPPED = enum.auto()  # no process, none wanted (yet)
    STARTING = enum.auto()  # spawned, nothing heard yet
    RUNNING = enum.auto()  # hello or status received
    BACKOFF = enum.auto()  # crashed, restart scheduled
    STOPPING = enum.auto()  # asked to exit, waiting for the exit
    FATAL = enum.auto()  # gave up: the network failed


_S = WorkerState
#: Allowed (from, to) moves. Anything else raises SupervisionError.
_TRANSITIONS: Final[frozenset[tuple[WorkerState, WorkerState]]] = frozenset(
    {
        (_S.STOPPED, _S.STARTING),
        (_S.STOPPED, _S.RUNNING),  # adopt: a worker that outlived the previous controller
        (_S.BACKOFF, _S.RUNNING),  # adopt a survivor that reported late, instead of the restart
        (_S.RUNNING, _S.STOPPED),  # hand over: released at an orderly stop, left running
        (_S.FATAL, _S.STARTING),
        (_S.STARTING, _S.RUNNING),
        (_S.STARTING, _S.BACKOFF),
        (_S.RUNNING, _S.BACKOFF),
        (_S.STARTING, _S.STOPPING),
        (_S.RUNNING, _S.STOPPING),
        (_S.STOPPING, _S.STOPPED),
        (_S.STOPPING, _S.FATAL),
        (_S.BACKOFF, _S.STARTING),
        (_S.BACKOFF, _S.STOPPED),
        (_S.BACKOFF, _S.FATAL),
        (_S.STARTING, _S.FATAL),
        (_S.RUNNING, _S.FATAL),
    }
)


# ---- actions ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Spawn:
    """Start the worker for `queue` and report `on_spawned` (or `on_spawn_failed`)."""

    network: str
    queue: int


@dataclasses.dataclass(frozen=True, slots=True)
class Terminate:
    """Send the worker `Shutdown(reason)` over the bus and SIGTERM."""

    network: str
    queue: int
    pid: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Kill:
    """SIGKILL the worker (grace expired or silent too long)."""

    network: str
    queue: int
    pid: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkFailed:
    """The network gave up; its other workers are being stopped."""

    network: str
    reason: str


Action = Spawn | Terminate | Kill | NetworkFailed


def backoff_delay(crashes: int) -> float:
    """Delay before the restart that follows the `crashes`-th recent crash (>= 1): none for the first
    (a killed worker is back at once), then RESTART_BACKOFF_MIN doubling up to RESTART_BACKOFF_MAX."""
    if crashes < 2:
        return 0.0
    # 2**exp overflows nothing: the cap is reached long before large exponents.
    return min(RESTART_BACKOFF_MIN * 2.0 ** min(crashes - 2, 64), RESTART_BACKOFF_MAX)


@dataclasses.dataclass(slots=True)
class WorkerSlot:
    """The supervised state of one queue's worker (read it, don't write it)."""

    queue: int
    state: WorkerState = WorkerState.STOPPED
    pid: int | None = None
    #: Time of the last sign of life (spawn, hello, status).
    last_seen: float = 0.0
    #: When the running process was spawned (or adopted).
    spawned_at: float = 0.0
    #: BACKOFF: when to respawn. STOPPING: when to Kill.
    deadline: float | None = None
    #: The silence Kill was sent; don't send it again.
    killed: bool = False
    #: Crash times within the window, oldest first.
    crashes: deque[float] = dataclasses.field(default_factory=deque)
    #: Times of exits caused by network input within the window (not crashes).
    remote_exits: deque[float] = dataclasses.field(default_factory=deque)
    #: What the running worker said when it ended (`on_exiting`), until its exit.
    exit_reason: str = ""
    exit_remote: bool = False
    #: Restarts since the network was started (shown in status).
    restarts: int = 0
    last_error: str = ""

    def move(self, to: WorkerState) -> None:
        if (self.state, to) not in _TRANSITIONS:
            raise SupervisionError(f"queue {self.queue}: {self.state.name} -> {to.name} is not allowed")
        self.state = to


class NetworkSupervisor:
    """Supervises the workers of one network. Pure; see the module docstring."""

    def __init__(self, network: str, queues: int) -> None:
        if queues < 1:
            raise ValueError("a network has at least one queue")
        self.network = network
        self.slots: tuple[WorkerSlot, ...] = tuple(WorkerSlot(q) for q in range(queues))
        #: Set when the network gave up; cleared by start().
        self.failed_reason: str = ""
        self._stopping = False

    # ---- queries -----------------------------------------------------------

    @property
    def failed(self) -> bool:
        return bool(self.failed_reason)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def stopped(self) -> bool:
        """True when no worker process is alive or expected."""
        return all(s.state in (_S.STOPPED, _S.FATAL, _S.BACKOFF) and s.pid is None for s in self.slots)

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.slots)

    def slot_by_pid(self, pid: int) -> WorkerSlot | None:
        for slot in self.slots:
            if slot.pid == pid:
                return slot
        return None

    def next_deadline(self) -> float | None:
        """Earliest time at which `tick` may have something to do."""
        times: list[float] = []
        for s in self.slots:
            if s.deadline is not None:
                times.append(s.deadline)
            if s.state in (_S.STARTING, _S.RUNNING) and not s.killed:
                times.append(s.last_seen + WORKER_STATUS_TIMEOUT)
        return min(times, default=None)

    # ---- commands ------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Spawn every worker that is not running (also restarts a failed network)."""
        self.failed_reason = ""
        self._stopping = False
        actions: list[Action] = []
        for s in self.slots:
            if s.state in (_S.STOPPED, _S.FATAL):
                s.crashes.clear()
                s.remote_exits.clear()
                s.move(_S.STARTING)
                s.pid, s.killed, s.deadline, s.last_seen = None, False, None, now
                actions.append(Spawn(self.network, s.queue))
        return actions

    def adopt(self, queue: int, pid: int, now: float) -> None:
        """Take over `pid`, a running worker of `queue` left by the previous controller (before `start`,
        or later while `can_adopt(queue)`: a survivor that reported after the adoption wait)."""
        s = self._slot(queue)
        s.move(_S.RUNNING)
        s.pid, s.last_seen, s.killed, s.deadline = pid, now, False, None
        s.spawned_at = now

    def can_adopt(self, queue: int) -> bool:
        """True when `queue` has no live or starting worker (never started, or waiting to restart) and the
        network is neither stopping nor failed: a late survivor may take the slot."""
        s = self._slot(queue)
        return not self._stopping and not self.failed and s.pid is None and s.state in (_S.STOPPED, _S.BACKOFF)

    def hand_over(self, queue: int) -> int | None:
        """Release `queue`'s running worker (orderly stop): it is left running for the next controller,
        this supervisor forgets it. Returns its pid, None when nothing was running."""
        s = self._slot(queue)
        if s.state is not _S.RUNNING or s.pid is None:
            return None
        pid = s.pid
        s.move(_S.STOPPED)
        s.pid, s.deadline, s.killed, s.exit_reason, s.exit_remote = None, None, False, "", False
        return pid

    def create_failed(self, reason: str) -> None:
        """The network could not be created, so no worker was ever started: it is failed with `reason`
        (cleared by `start`); there is nothing to stop."""
        self.failed_reason = reason

    def stop(self, now: float, reason: str) -> list[Action]:
        """Ask every worker to exit; pending restarts are cancelled."""
        self._stopping = True
        return [a for s in self.slots for a in self._stop_slot(s, now, reason, _S.STOPPED)]

    # ---- events ------------------------------------------------------------

    def on_spawned(self, queue: int, pid: int, now: float) -> list[Action]:
        s = self._slot(queue)
        if s.state is not _S.STARTING or s.pid is not None:
            # Stopped (or failed) while the spawn was in flight: not wanted any more.
            return [Kill(self.network, queue, pid, "not wanted any more")]
        s.pid, s.last_seen, s.killed = pid, now, False
        s.spawned_at = now
        return []

    def on_spawn_failed(self, queue: int, now: float, reason: str) -> list[Action]:
        """The process could not even be started: counts as a crash."""
        s = self._slot(queue)
        if s.state is not _S.STARTING or s.pid is not None:
            return []  # stopped while the spawn was in flight
        return self._crashed(s, now, f"spawn failed: {reason}")

    def on_alive(self, queue: int, pid: int, now: float) -> bool:
        """A hello or status from `pid` for `queue`. False when it is not ours (ignore it)."""
        s = self._slot(queue)
        if s.pid != pid or s.state not in (_S.STARTING, _S.RUNNING, _S.STOPPING):
            return False
        s.last_seen = now
        if s.state is _S.STARTING:
            s.move(_S.RUNNING)
        return True

    def on_fatal(self, queue: int, pid: int | None, now: float, reason: str) -> list[Action]:
        """The worker said a restart cannot help (`WorkerExiting(fatal=True)`)."""
        s = self._slot(queue)
        if (pid is not None and s.pid != pid) or self._stopping:
            return []
        s.last_error = reason
        return self._give_up(now, f"queue {queue}: {reason}")

    def on_exiting(self, queue: int, reason: str, *, remote: bool) -> None:
        """The worker's last words (`WorkerExiting`, not fatal): kept for its exit.

        They normally arrive before the exit is reaped; words arriving after
        it (the slot has no process) only update ``last_error``.
        """
        s = self._slot(queue)
        s.last_error = reason
        if s.pid is not None:
            s.exit_reason, s.exit_remote = reason, remote

    def on_exit(self, pid: int, now: float, returncode: int | None) -> list[Action]:
        """Process `pid` exited (reaped). Unknown pids are ignored."""
        s = self.slot_by_pid(pid)
        if s is None:
            return []
        was_killed = s.killed
        if not was_killed and now - s.spawned_at >= RESTART_STABLE:  # it had started successfully: a fresh count
            s.crashes.clear()
            s.remote_exits.clear()
        reported, remote = s.exit_reason, s.exit_remote
        s.pid, s.killed, s.exit_reason, s.exit_remote = None, False, "", False
        if s.state is _S.STOPPING:
            s.move(_S.FATAL if self.failed else _S.STOPPED)
            s.deadline = None
            return []
        if s.state is _S.FATAL:  # killed while giving up
            return []
        if self._stopping:
            raise SupervisionError(f"queue {s.queue}: {s.state.name} while the network is stopping")
        if was_killed:
            why = s.last_error
        elif reported:
            why = f"{reported} (exit status {returncode})"
        else:
            why = f"exited with status {returncode}"
        if remote and not was_killed:
            return self._restart_later(s, now, why)
        return self._crashed(s, now, why)

    def tick(self, now: float) -> list[Action]:
        """Due restarts, silence kills and grace-period kills."""
        actions: list[Action] = []
        for s in self.slots:
            if s.state is _S.BACKOFF and s.deadline is not None and now >= s.deadline:
                s.move(_S.STARTING)
                s.deadline, s.last_seen, s.killed = None, now, False
                s.restarts += 1
                actions.append(Spawn(self.network, s.queue))
            elif s.state in (_S.STARTING, _S.RUNNING) and s.pid is not None and not s.killed:
                if now - s.last_seen > WORKER_STATUS_TIMEOUT:
                    s.killed = True
                    s.last_error = f"silent for {now - s.last_seen:.1f}s"
                    actions.append(Kill(self.network, s.queue, s.pid, s.last_error))
            elif s.state is _S.STOPPING and s.deadline is not None and now >= s.deadline:
                s.deadline = None
                if s.pid is not None:
                    actions.append(Kill(self.network, s.queue, s.pid, "did not stop in time"))
        return actions

    # ---- internals -----------------------------------------------------------

    def _slot(self, queue: int) -> WorkerSlot:
        if not 0 <= queue < len(self.slots):
            raise SupervisionError(f"no queue {queue} in network {self.network}")
        return self.slots[queue]

    def _crashed(self, s: WorkerSlot, now: float, why: str) -> list[Action]:
        s.last_error = why
        while s.crashes and now - s.crashes[0] > RESTART_WINDOW:
            s.crashes.popleft()
        s.crashes.append(now)
        if len(s.crashes) >= RESTART_MAX_IN_WINDOW:
            s.move(_S.BACKOFF)  # passes through BACKOFF so the table stays small
            return self._give_up(
                now,
                f"queue {s.queue} crashed {len(s.crashes)} times within {RESTART_WINDOW:g}s; last: {why}",
            )
        s.move(_S.BACKOFF)
        s.deadline = now + backoff_delay(len(s.crashes))
        return []

    def _restart_later(self, s: WorkerSlot, now: float, why: str) -> list[Action]:
        """An exit caused from the network: restart after a growing delay, never give up."""
        s.last_error = why
        while s.remote_exits and now - s.remote_exits[0] > RESTART_WINDOW:
            s.remote_exits.popleft()
        s.remote_exits.append(now)
        s.move(_S.BACKOFF)
        s.deadline = now + backoff_delay(len(s.remote_exits))
        return []

    def _give_up(self, now: float, reason: str) -> list[Action]:
        if self.failed:
            return []
        self.failed_reason = reason
        actions: list[Action] = [NetworkFailed(self.network, reason)]
        for s in self.slots:
            actions.extend(self._stop_slot(s, now, f"network failed: {reason}", _S.FATAL))
        return actions

    def _stop_slot(self, s: WorkerSlot, now: float, reason: str, idle: WorkerState) -> Iterable[Action]:
        if s.state in (_S.STARTING, _S.RUNNING):
            s.move(_S.STOPPING)
            if s.pid is None:  # spawn requested but not reported: on_spawned will not come
                s.move(idle)
                return ()
            s.deadline = now + STOP_GRACE
            return (Terminate(self.network, s.queue, s.pid, reason),)
        if s.state is _S.BACKOFF:
            s.move(idle)
            s.deadline = None
        elif s.state is _S.STOPPED and idle is _S.FATAL:
            pass  # never started: stays STOPPED
        return ()
