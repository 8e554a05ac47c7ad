"""Prometheus metrics, computed at scrape time from the controller's status.

A custom collector over a ``get_status() -> StatusReply`` callable (verbose,
so per-queue rows are included): nothing is double-booked, the exported
numbers are exactly what ``l3ptp status --json`` shows. Worker counters are
totals since each worker started, so they are exported as gauges
(``l3ptp_*``), not counters: a restarted worker starts again from zero.

Labels: ``network``; per-queue series also ``queue``; drops ``reason``
(the `DropReason` value); state series ``state``. Label values pass
through `ipc.text.printable` like every other text l3ptp shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from l3ptp.ipc.control_messages import NetworkState
from l3ptp.ipc.text import printable

__all__ = ["StatusCollector", "make_registry", "start_server"]


class StatusCollector(Collector):
    def __init__(self, get_status: Callable[[], Any]) -> None:
        self._get_status = get_status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reply = self._get_status()
        state = GaugeMetricFamily("l3ptp_network_state", "1 for the network's current state", labels=["network", "state"])
        restarts = GaugeMetricFamily("l3ptp_worker_restarts", "Worker restarts", labels=["network", "queue"])
        rtt = GaugeMetricFamily("l3ptp_rtt_milliseconds", "Smoothed RTT to the peer", labels=["network", "queue"])
        depth = GaugeMetricFamily("l3ptp_queue_depth", "Datagrams waiting to be sent", labels=["network", "queue"])
        lost = GaugeMetricFamily("l3ptp_seq_lost", "Packets lost peer->us (sequence gaps)", labels=["network", "queue"])
        rekeys = GaugeMetricFamily("l3ptp_key_updates", "QUIC key updates the worker started", labels=["network", "queue"])
        sessions = GaugeMetricFamily("l3ptp_sessions", "Sessions the worker established since it started (above 1: "
                                     "its peer reconnected, or keys were renewed)", labels=["network", "queue"])
        traffic = GaugeMetricFamily(
            "l3ptp_traffic", "Worker traffic counters by name", labels=["network", "queue", "counter"]
        )
        drops = GaugeMetricFamily("l3ptp_drops", "Dropped packets by reason", labels=["network", "queue", "reason"])
        for n in reply.networks:
            name = printable(n.name)
            for s in NetworkState:
                state.add_metric([name, s.value], 1.0 if n.state is s else 0.0)
            for q in n.queues:
                labels = [name, str(q.queue)]
                restarts.add_metric(labels, q.restarts)
                rtt.add_metric(labels, q.rtt_ms)
                depth.add_metric(labels, q.queue_depth)
                lost.add_metric(labels, q.seq_lost)
                rekeys.add_metric(labels, q.key_updates)
                sessions.add_metric(labels, q.sessions)
                for key, value in q.counters.items():
                    traffic.add_metric([*labels, printable(key)], value)
                for key, value in q.drops.items():
                    drops.add_metric([*labels, printable(key)], value)
        yield from (state, restarts, rtt, depth, lost, rekeys, sessions, traffic, drops)


def make_registry(get_status: Callable[[], Any]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(get_status))
    return registry


def start_server(get_status: Callable[[], Any], address: str, port: int) -> Any:
    """Serve /metrics on address:port in a thread; returns the server (call `shutdown()`)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=address, registry=make_registry(get_status))
    return server
