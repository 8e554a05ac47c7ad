"""Status aggregation: worker reports -> `NetworkStatus` -> `StatusReply`.

Pure. The controller keeps the newest `WorkerStatus` of each queue (replaced
when a new worker serves the queue) and builds the CLI's view from it:

* counters and drops of a network are the per-key sums over its queues;
* rtt_ms is the mean over queues whose session is established (0 if none);
* mtu is the smallest negotiated MTU of the queues, or the interface's
  before any READY; interface_mtu is the interface's (for ``mtu = "auto"``
  the derived one), mtu_source and mtu_note say where it came from;
* the state follows `network_state`: FAILED / DOWN / STOPPING override;
  UP when every queue is established, DEGRADED when some are (or a worker
  is waiting to restart), CONNECTING when workers run but none is
  established, STARTING before any worker has reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from l3ptp.controller.config import NetworkConfig
from l3ptp.controller.supervision import NetworkSupervisor, WorkerState
from l3ptp.ipc.control_messages import (
    NetworkState,
    NetworkStatus,
    QueueStatus,
    SessionState,
    StatusReply,
    UnderlayPorts,
    WorkerStatus,
)
from l3ptp.ipc.types import PeerRole

__all__ = ["network_state", "network_status", "queue_status", "status_reply", "sum_counts"]

_U64_MAX = (1 << 64) - 1


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Per-key sums (saturating at 2**64-1, the wire limit), keys sorted."""
    out: dict[str, int] = {}
    for c in counts:
        for key, value in c.items():
            out[key] = min(out.get(key, 0) + value, _U64_MAX)
    return dict(sorted(out.items()))


def network_state(
    sessions: Sequence[SessionState | None],
    *,
    failed: bool = False,
    admin_down: bool = False,
    stopping: bool = False,
    restarting: bool = False,
) -> NetworkState:
    """State of a network from each queue's session (None: no report yet)."""
    if failed:
        return NetworkState.FAILED
    if admin_down:
        return NetworkState.DOWN
    if stopping:
        return NetworkState.STOPPING
    established = sum(1 for s in sessions if s is SessionState.ESTABLISHED)
    if sessions and established == len(sessions):
        return NetworkState.UP
    if established or restarting:
        return NetworkState.DEGRADED
    if any(s is not None for s in sessions):
        return NetworkState.CONNECTING
    return NetworkState.STARTING


def queue_status(queue: int, report: WorkerStatus | None, *, pid: int, restarts: int, last_error: str) -> QueueStatus:
    """One queue's row. Without a report (worker not heard from) counters are empty."""
    if report is None:
        return QueueStatus(
            queue=queue,
            pid=pid,
            state=SessionState.STARTING if pid else SessionState.STOPPED,
            peer="",
            rtt_ms=0.0,
            mtu=0,
            counters={},
            drops={},
            queue_depth=0,
            seq_lost=0,
            key_updates=0,
            restarts=restarts,
            last_error=last_error,
        )
    return QueueStatus(
        queue=queue,
        pid=pid,
        state=report.state,
        peer=report.peer,
        rtt_ms=report.rtt_ms,
        mtu=report.mtu,
        counters=dict(report.counters),
        drops=dict(report.drops),
        queue_depth=report.queue_depth,
        seq_lost=report.seq_lost,
        key_updates=report.key_updates,
        restarts=restarts,
        last_error=report.last_error or last_error,
        peer_key=report.peer_key,
        sessions=report.sessions,
    )


def network_status(
    net: NetworkConfig,
    sup: NetworkSupervisor | None,
    reports: Mapping[int, WorkerStatus],
    *,
    admin_down: bool = False,
    routes: Iterable[str] = (),
    last_error: str = "",
    mtu_source: str = "",
    mtu_note: str = "",
    local_key: str = "",
) -> NetworkStatus:
    """Aggregate one network. `sup` is None for a network that is not running."""
    queues: list[QueueStatus] = []
    sessions: list[SessionState | None] = []
    restarting = False
    for q in range(net.queues):
        slot = sup.slots[q] if sup is not None else None
        report = reports.get(q)
        pid = slot.pid if slot is not None and slot.pid is not None else 0
        if slot is not None and slot.state is WorkerState.BACKOFF:
            restarting = True
        live = report if (report is not None and pid and report.pid == pid) else None
        sessions.append(live.state if live is not None else None)
        queues.append(
            queue_status(
                q,
                live,
                pid=pid,
                restarts=slot.restarts if slot is not None else 0,
                last_error=slot.last_error if slot is not None else "",
            )
        )
    state = network_state(
        sessions,
        failed=sup is not None and sup.failed,
        admin_down=admin_down or sup is None,
        stopping=sup is not None and sup.stopping,
        restarting=restarting,
    )
    established = [qs for qs in queues if qs.state is SessionState.ESTABLISHED]
    rtt = sum(qs.rtt_ms for qs in established) / len(established) if established else 0.0
    mtus = [qs.mtu for qs in queues if qs.mtu]
    u = net.underlay
    peer_addr = u.peer if u.peer is not None else ""
    error = (sup.failed_reason if sup is not None and sup.failed else "") or last_error
    if not error:
        error = next((qs.last_error for qs in queues if qs.last_error), "")
    return NetworkStatus(
        name=net.name,
        state=state,
        interface=net.interface,
        role=PeerRole(net.role),
        peer=str(peer_addr),
        port=u.port,
        ports=UnderlayPorts(u.ports),
        addresses=tuple(str(a) for a in net.addresses()),
        peer_addresses=tuple(str(a) for a in net.peer_addresses()),
        mtu=min(mtus) if mtus else net.mtu,
        rtt_ms=rtt,
        counters=sum_counts(qs.counters for qs in queues),
        drops=sum_counts(qs.drops for qs in queues),
        restarts=sum(qs.restarts for qs in queues),
        routes=tuple(str(r) for r in routes),
        last_error=error[:512],
        queues=tuple(queues),
        peer_keys=tuple(sorted({qs.peer_key for qs in queues if qs.peer_key})),
        local_key=local_key,
        paths=tuple(dict.fromkeys(qs.peer for qs in queues if qs.peer)),
        interface_mtu=net.mtu if sup is not None else 0,
        mtu_source=mtu_source[:16],
        mtu_note=mtu_note[:512],
    )


def status_reply(
    *, controller_pid: int, uptime: float, node_id: str, networks: Iterable[NetworkStatus], verbose: bool
) -> StatusReply:
    """The CLI reply; without `verbose` the per-queue rows are left out."""
    nets = tuple(networks)
    if not verbose:
        nets = tuple(_without_queues(n) for n in nets)
    return StatusReply(controller_pid=controller_pid, uptime=max(uptime, 0.0), node_id=node_id, networks=nets)


def _without_queues(n: NetworkStatus) -> NetworkStatus:
    return dataclasses.replace(n, queues=())
