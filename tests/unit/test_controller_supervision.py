"""Unit tests for l3ptp.controller.supervision (pure: fake clock, no processes)."""

from __future__ import annotations

import itertools

import pytest

from l3ptp.controller.supervision import (
    STOP_GRACE,
    Kill,
    NetworkFailed,
    NetworkSupervisor,
    Spawn,
    SupervisionError,
    Terminate,
    WorkerState,
    backoff_delay,
)
from l3ptp.ipc.constants import (
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    RESTART_MAX_IN_WINDOW,
    RESTART_STABLE,
    RESTART_WINDOW,
    WORKER_STATUS_TIMEOUT,
)
from tests.support.clock import FakeClock

_pids = itertools.count(100)


def started(queues: int = 1) -> tuple[NetworkSupervisor, FakeClock, list[int]]:
    """A supervisor whose workers are spawned and have said hello."""
    clock = FakeClock()
    sup = NetworkSupervisor("office", queues)
    actions = sup.start(clock.now)
    assert actions == [Spawn("office", q) for q in range(queues)]
    pids = []
    for q in range(queues):
        pid = next(_pids)
        assert sup.on_spawned(q, pid, clock.now) == []
        assert sup.on_alive(q, pid, clock.now)
        pids.append(pid)
    return sup, clock, pids


def respawn(sup: NetworkSupervisor, clock: FakeClock, queue: int = 0) -> int:
    """Advance to the scheduled restart, check it, report the new pid."""
    deadline = sup.slots[queue].deadline
    assert deadline is not None
    clock.now = deadline
    assert sup.tick(clock.now) == [Spawn("office", queue)]
    pid = next(_pids)
    sup.on_spawned(queue, pid, clock.now)
    return pid


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert backoff_delay(1) == 0.0  # the first crash in the window: back at once
    assert backoff_delay(2) == RESTART_BACKOFF_MIN
    assert backoff_delay(3) == 2 * RESTART_BACKOFF_MIN
    assert backoff_delay(4) == 4 * RESTART_BACKOFF_MIN
    assert backoff_delay(1000) == RESTART_BACKOFF_MAX
    assert backoff_delay(0) == 0.0


def test_start_spawns_every_queue_and_hello_makes_running() -> None:
    sup, _, pids = started(3)
    assert [s.state for s in sup.slots] == [WorkerState.RUNNING] * 3
    assert [s.pid for s in sup.slots] == pids
    assert not sup.failed


def test_crash_restarts_with_growing_delay() -> None:
    sup, clock, (pid,) = started()
    delays = []
    for _ in range(RESTART_MAX_IN_WINDOW - 1):
        assert sup.on_exit(pid, clock.now, 1) == []
        slot = sup.slots[0]
        assert slot.state is WorkerState.BACKOFF
        assert slot.last_error == "exited with status 1"
        assert slot.deadline is not None
        delays.append(slot.deadline - clock.now)
        # nothing happens before the deadline: no restart storm
        assert sup.tick(slot.deadline - 0.01) == []
        pid = respawn(sup, clock)
    assert delays == [backoff_delay(n) for n in range(1, RESTART_MAX_IN_WINDOW)]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert sup.slots[0].restarts == RESTART_MAX_IN_WINDOW - 1
    assert sup.restarts == RESTART_MAX_IN_WINDOW - 1


def test_repeated_crashes_within_window_fail_the_network_with_reason() -> None:
    sup, clock, pids = started(2)
    pid = pids[0]
    for _ in range(RESTART_MAX_IN_WINDOW - 1):
        sup.on_exit(pid, clock.now, 3)
        pid = respawn(sup, clock)
    actions = sup.on_exit(pid, clock.now, 3)
    assert sup.failed
    assert f"crashed {RESTART_MAX_IN_WINDOW} times within" in sup.failed_reason
    assert "exited with status 3" in sup.failed_reason
    assert actions[0] == NetworkFailed("office", sup.failed_reason)
    # the healthy queue is stopped, the crashed one is not restarted
    assert actions[1:] == [Terminate("office", 1, pids[1], f"network failed: {sup.failed_reason}")]
    assert sup.slots[0].state is WorkerState.FATAL
    clock.advance(RESTART_BACKOFF_MAX * 10)
    assert all(not isinstance(a, Spawn) for a in sup.tick(clock.now))
    assert sup.on_exit(pids[1], clock.now, 0) == []
    assert [s.state for s in sup.slots] == [WorkerState.FATAL, WorkerState.FATAL]
    assert sup.stopped


def test_crashes_spread_beyond_the_window_do_not_fail() -> None:
    sup, clock, (pid,) = started()
    for _ in range(RESTART_MAX_IN_WINDOW * 3):
        clock.advance(RESTART_WINDOW + 1)
        assert sup.on_exit(pid, clock.now, 1) == []
        # an old crash fell out of the window: each is a first crash, restarted at once
        assert sup.slots[0].deadline == clock.now
        pid = respawn(sup, clock)
    assert not sup.failed


def test_failed_network_can_be_started_again() -> None:
    sup, clock, (pid,) = started()
    sup.on_fatal(0, pid, clock.now, "ticket refused")
    assert sup.failed and "ticket refused" in sup.failed_reason
    sup.on_exit(pid, clock.now, 1)
    assert sup.start(clock.now) == [Spawn("office", 0)]
    assert not sup.failed
    assert sup.slots[0].crashes == type(sup.slots[0].crashes)()


def test_fatal_exit_fails_at_once_and_stops_the_rest() -> None:
    sup, clock, pids = started(2)
    actions = sup.on_fatal(1, pids[1], clock.now, "bad key")
    assert isinstance(actions[0], NetworkFailed) and "queue 1: bad key" in actions[0].reason
    assert {a.queue for a in actions[1:] if isinstance(a, Terminate)} == {0, 1}
    # a fatal report from a stale pid is ignored
    sup2, clock2, pids2 = started(1)
    assert sup2.on_fatal(0, 99999, clock2.now, "x") == []
    assert not sup2.failed


def test_silent_worker_is_killed_once_and_its_exit_is_a_crash() -> None:
    sup, clock, (pid,) = started()
    assert sup.next_deadline() == clock.now + WORKER_STATUS_TIMEOUT
    clock.advance(WORKER_STATUS_TIMEOUT)
    assert sup.tick(clock.now) == []  # exactly the timeout is still alive
    clock.advance(0.5)
    (kill,) = sup.tick(clock.now)
    assert isinstance(kill, Kill) and kill.pid == pid and kill.reason.startswith("silent")
    assert sup.tick(clock.now + 1) == []  # not killed twice
    assert sup.on_exit(pid, clock.now + 1, -9) == []
    assert sup.slots[0].state is WorkerState.BACKOFF
    assert sup.slots[0].last_error.startswith("silent")


def test_status_keeps_a_worker_alive() -> None:
    sup, clock, (pid,) = started()
    for _ in range(10):
        clock.advance(WORKER_STATUS_TIMEOUT - 1)
        assert sup.on_alive(0, pid, clock.now)
        assert sup.tick(clock.now) == []


def test_worker_that_never_says_hello_is_dead_too() -> None:
    clock = FakeClock()
    sup = NetworkSupervisor("office", 1)
    sup.start(clock.now)
    sup.on_spawned(0, 7, clock.now)
    assert sup.slots[0].state is WorkerState.STARTING
    clock.advance(WORKER_STATUS_TIMEOUT + 1)
    assert sup.tick(clock.now) == [Kill("office", 0, 7, sup.slots[0].last_error)]


def test_messages_from_unknown_pids_are_ignored() -> None:
    sup, clock, (pid,) = started()
    assert not sup.on_alive(0, pid + 1000, clock.now)
    assert sup.on_exit(pid + 1000, clock.now, 0) == []
    assert sup.slots[0].state is WorkerState.RUNNING


def test_stop_terminates_then_kills_after_grace() -> None:
    sup, clock, pids = started(2)
    actions = sup.stop(clock.now, "down")
    assert actions == [Terminate("office", q, pids[q], "down") for q in range(2)]
    assert sup.stopping
    assert sup.on_exit(pids[0], clock.now, 0) == []
    assert sup.slots[0].state is WorkerState.STOPPED
    assert sup.tick(clock.now + STOP_GRACE - 0.1) == []
    assert sup.tick(clock.now + STOP_GRACE) == [Kill("office", 1, pids[1], "did not stop in time")]
    sup.on_exit(pids[1], clock.now + STOP_GRACE, -9)
    assert sup.stopped
    assert not sup.failed


def test_stop_cancels_a_pending_restart() -> None:
    sup, clock, (pid,) = started()
    sup.on_exit(pid, clock.now, 1)
    assert sup.stop(clock.now, "down") == []
    assert sup.slots[0].state is WorkerState.STOPPED
    assert sup.tick(clock.now + RESTART_BACKOFF_MAX) == []
    assert sup.stopped


def test_spawn_reported_after_stop_is_killed() -> None:
    clock = FakeClock()
    sup = NetworkSupervisor("office", 1)
    sup.start(clock.now)
    sup.stop(clock.now, "down")
    assert sup.slots[0].state is WorkerState.STOPPED
    assert sup.on_spawned(0, 55, clock.now) == [Kill("office", 0, 55, "not wanted any more")]
    assert sup.on_spawn_failed(0, clock.now, "ENOENT") == []


def test_spawn_failure_counts_as_crash() -> None:
    clock = FakeClock()
    sup = NetworkSupervisor("office", 1)
    sup.start(clock.now)
    assert sup.on_spawn_failed(0, clock.now, "No such file") == []
    assert sup.slots[0].state is WorkerState.BACKOFF
    assert "spawn failed" in sup.slots[0].last_error


def test_transitions_outside_the_table_raise() -> None:
    sup, clock, _ = started()
    with pytest.raises(SupervisionError):
        sup.slots[0].move(WorkerState.STARTING)
    with pytest.raises(SupervisionError):
        sup.on_alive(5, 1, clock.now)
    with pytest.raises(ValueError):
        NetworkSupervisor("office", 0)


def test_next_deadline_tracks_backoff() -> None:
    sup, clock, (pid,) = started()
    sup.on_exit(pid, clock.now, 1)
    assert sup.next_deadline() == clock.now  # first crash: at once
    pid = respawn(sup, clock)
    sup.on_exit(pid, clock.now, 1)
    assert sup.next_deadline() == clock.now + RESTART_BACKOFF_MIN
    idle = NetworkSupervisor("x", 1)
    assert idle.next_deadline() is None


def test_the_reason_a_worker_gave_survives_its_exit() -> None:
    sup, clock, (pid,) = started()
    sup.on_exiting(0, "TUN queue unusable: end of file", remote=False)
    assert sup.on_exit(pid, clock.now, 0) == []
    assert sup.slots[0].last_error == "TUN queue unusable: end of file (exit status 0)"
    assert len(sup.slots[0].crashes) == 1  # a local fault: a crash
    pid = respawn(sup, clock)
    assert sup.on_exit(pid, clock.now, 1) == []  # said nothing this time
    assert sup.slots[0].last_error == "exited with status 1"


def test_exits_caused_from_the_network_never_fail_the_network() -> None:
    """A peer (or a stranger) that makes the worker end again and again gets it
    restarted with the growing delay, but the network never becomes FAILED:
    that state is for local faults. Local crashes still count as before."""
    sup, clock, (pid,) = started()
    delays = []
    for _ in range(RESTART_MAX_IN_WINDOW * 3):
        sup.on_exiting(0, "internal error in _on_udp_readable: SchemaError()", remote=True)
        assert sup.on_exit(pid, clock.now, 0) == []
        slot = sup.slots[0]
        assert slot.state is WorkerState.BACKOFF and not sup.failed
        assert slot.last_error == "internal error in _on_udp_readable: SchemaError() (exit status 0)"
        delays.append(slot.deadline - clock.now)
        pid = respawn(sup, clock)
    assert delays[:4] == [backoff_delay(n) for n in range(1, 5)] and max(delays) <= RESTART_BACKOFF_MAX
    assert not sup.slots[0].crashes and sup.slots[0].restarts == RESTART_MAX_IN_WINDOW * 3
    for _ in range(RESTART_MAX_IN_WINDOW - 1):
        sup.on_exit(pid, clock.now, 1)
        pid = respawn(sup, clock)
    sup.on_exit(pid, clock.now, 1)
    assert sup.failed and "exited with status 1" in sup.failed_reason


def test_last_words_after_the_exit_are_not_kept_for_the_next_worker() -> None:
    sup, clock, (pid,) = started()
    sup.on_exit(pid, clock.now, 0)  # reaped before its WorkerExiting was read
    sup.on_exiting(0, "internal error in _on_udp_readable: X()", remote=True)
    assert sup.slots[0].last_error == "internal error in _on_udp_readable: X()"
    pid = respawn(sup, clock)
    sup.on_alive(0, pid, clock.now)
    sup.on_exit(pid, clock.now, 1)
    assert sup.slots[0].last_error == "exited with status 1" and len(sup.slots[0].crashes) == 2


def test_a_worker_that_ran_long_enough_is_restarted_at_once_every_time() -> None:
    """kill -9 of a healthy worker, again and again: each replacement ran RESTART_STABLE s, so each exit is
    a first crash (restarted at once) and the network never fails; a young death still counts."""
    sup, clock, (pid,) = started()
    for _ in range(RESTART_MAX_IN_WINDOW * 2):
        clock.advance(RESTART_STABLE)
        assert sup.on_exit(pid, clock.now, -9) == []
        assert sup.slots[0].deadline == clock.now and len(sup.slots[0].crashes) == 1
        pid = respawn(sup, clock)
    assert not sup.failed
    clock.advance(RESTART_STABLE - 0.1)  # died young: the second crash in the window
    sup.on_exit(pid, clock.now, -9)
    assert sup.slots[0].deadline == clock.now + backoff_delay(2) and len(sup.slots[0].crashes) == 2


def test_a_worker_killed_for_silence_keeps_its_crash_history() -> None:
    sup, clock, (pid,) = started()
    sup.on_exit(pid, clock.now, 1)
    pid = respawn(sup, clock)
    clock.advance(WORKER_STATUS_TIMEOUT + 1)
    assert sup.tick(clock.now) == [Kill("office", 0, pid, sup.slots[0].last_error)]
    sup.on_exit(pid, clock.now, -9)
    assert len(sup.slots[0].crashes) == 2 and sup.slots[0].deadline == clock.now + backoff_delay(2)


def test_hand_over_releases_only_a_running_worker_and_late_adoption_needs_a_free_queue() -> None:
    from l3ptp.controller.supervision import NetworkSupervisor, WorkerState

    sup = NetworkSupervisor("n", 2)
    sup.start(0.0)
    sup.on_spawned(0, 100, 0.0)
    sup.on_spawned(1, 101, 0.0)
    assert sup.on_alive(0, 100, 0.1)
    assert sup.hand_over(1) is None  # STARTING, nothing heard: stopped as before, not handed over
    assert sup.hand_over(0) == 100
    assert sup.slots[0].state is WorkerState.STOPPED and sup.slots[0].pid is None
    assert sup.slot_by_pid(100) is None
    assert [a.pid for a in sup.tick(100.0)] == [101]  # only the worker still ours is supervised
    # late adoption: only into a queue without a live worker
    sup2 = NetworkSupervisor("m", 1)
    sup2.start(0.0)
    assert not sup2.can_adopt(0)  # spawn in flight
    sup2.on_spawned(0, 200, 0.0)
    assert not sup2.can_adopt(0)
    sup2.on_exit(200, 1.0, 1)  # first crash: back-off
    assert sup2.slots[0].state is WorkerState.BACKOFF and sup2.can_adopt(0)
    sup2.adopt(0, 300, 1.1)
    assert sup2.slots[0].state is WorkerState.RUNNING and sup2.slots[0].deadline is None
    assert sup2.tick(1.2) == []  # the pending restart is gone
    sup2.stop(2.0, "down")
    assert not sup2.can_adopt(0)
