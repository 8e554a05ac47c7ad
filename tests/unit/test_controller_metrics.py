"""The metrics collector: Prometheus text format, parsed back."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from l3ptp.controller.metrics import make_registry
from l3ptp.controller.status import network_status, status_reply
from l3ptp.ipc.control_messages import SessionState
from tests.unit.test_controller_status import network, report, running


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    sup = running(2)
    sup.on_exit(101, 1.0, 1)
    sup.tick(100.0)
    sup.on_spawned(1, 200, 100.0)
    st = network_status(
        network(2),
        sup,
        {0: report(0, 100, drops={"queue_full": 4}, key_updates=7, sessions=3), 1: report(1, 200, state=SessionState.CONNECTING)},
    )
    reply = status_reply(controller_pid=1, uptime=1.0, node_id="alpha", networks=[st], verbose=True)
    text = generate_latest(make_registry(lambda: reply)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_carry_the_numbers() -> None:
    got = samples()
    assert got[("l3ptp_network_state", (("network", "office"), ("state", "degraded")))] == 1.0
    assert got[("l3ptp_network_state", (("network", "office"), ("state", "up")))] == 0.0
    assert got[("l3ptp_worker_restarts", (("network", "office"), ("queue", "1")))] == 1.0
    assert got[("l3ptp_drops", (("network", "office"), ("queue", "0"), ("reason", "queue_full")))] == 4.0
    key = ("l3ptp_traffic", (("counter", "tun_rx_packets"), ("network", "office"), ("queue", "0")))
    assert got[key] == 10.0
    assert got[("l3ptp_rtt_milliseconds", (("network", "office"), ("queue", "0")))] == 2.0
    assert ("l3ptp_queue_depth", (("network", "office"), ("queue", "1"))) in got
    assert got[("l3ptp_key_updates", (("network", "office"), ("queue", "0")))] == 7.0
    assert got[("l3ptp_sessions", (("network", "office"), ("queue", "0")))] == 3.0


def test_label_values_are_escaped() -> None:
    """Label values go through the one escaping function (the schema keeps
    controls out of names today; the exporter does not rely on it)."""
    from types import SimpleNamespace

    from l3ptp.ipc.control_messages import NetworkState

    queue = SimpleNamespace(queue=0, restarts=0, rtt_ms=0.0, queue_depth=0, seq_lost=0, key_updates=0, sessions=1,
                            counters={"x\x1b[2J": 1}, drops={"d\x07\r": 2})
    net = SimpleNamespace(name="n\x1b]0;t\x07", state=NetworkState.UP, queues=(queue,))
    text = generate_latest(make_registry(lambda: SimpleNamespace(networks=(net,)))).decode()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    labels = [dict(s.labels) for f in text_string_to_metric_families(text) for s in f.samples]
    assert {"network": "n\\x1b]0;t\\x07", "queue": "0", "counter": "x\\x1b[2J"} in labels
    assert {"network": "n\\x1b]0;t\\x07", "queue": "0", "reason": "d\\x07\\x0d"} in labels
