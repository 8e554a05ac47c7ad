

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
