"""Unit tests for l3ptp.controller.status (pure)."""

from __future__ import annotations

from typing import Any

from l3ptp.controller.config import NetworkConfig, parse_config
from l3ptp.controller.status import network_state, network_status, status_reply, sum_counts
from l3ptp.controller.supervision import NetworkSupervisor
from l3ptp.ipc.control_messages import CLI_REPLIES, NetworkState, SessionState, WorkerStatus
from tests.support.config_builders import config, office

S = SessionState


def network(queues: int = 2) -> NetworkConfig:
    return parse_config(config({"office": office(queues=queues, mtu=1280)})).networks[0]


def report(queue: int, pid: int, state: SessionState = S.ESTABLISHED, **kw: Any) -> WorkerStatus:
    fields: dict[str, Any] = dict(
        network="office",
        queue=queue,
        pid=pid,
        state=state,
        peer="198.18.0.2:4433",
        rtt_ms=2.0,
        mtu=1280,
        counters={"tun_rx_packets": 10, "tun_rx_bytes": 1000},
        drops={"dgram_bad_header": 1},
        queue_depth=0,
        seq_lost=0,
        sessions=1,
        key_updates=0,
        last_error="",
    )
    fields.update(kw)
    return WorkerStatus(**fields)


def running(queues: int = 2) -> NetworkSupervisor:
    sup = NetworkSupervisor("office", queues)
    sup.start(0.0)
    for q in range(queues):
        sup.on_spawned(q, 100 + q, 0.0)
        sup.on_alive(q, 100 + q, 0.0)
    return sup


def test_state_rules() -> None:
    assert network_state([S.ESTABLISHED, S.ESTABLISHED]) is NetworkState.UP
    assert network_state([S.ESTABLISHED, S.CONNECTING]) is NetworkState.DEGRADED
    assert network_state([S.CONNECTING, None], restarting=True) is NetworkState.DEGRADED
    assert network_state([S.CONNECTING, None]) is NetworkState.CONNECTING
    assert network_state([None, None]) is NetworkState.STARTING
    assert network_state([S.ESTABLISHED], failed=True) is NetworkState.FAILED
    assert network_state([S.ESTABLISHED], admin_down=True) is NetworkState.DOWN
    assert network_state([S.ESTABLISHED], stopping=True) is NetworkState.STOPPING


def test_sum_counts() -> None:
    assert sum_counts([{"b": 1, "a": 2}, {"a": 3}]) == {"a": 5, "b": 1}
    assert sum_counts([{"a": 2**64 - 1}, {"a": 5}]) == {"a": 2**64 - 1}
    assert list(sum_counts([{"b": 1, "a": 2}])) == ["a", "b"]


def test_network_status_sums_queues() -> None:
    net, sup = network(), running()
    reports = {0: report(0, 100, rtt_ms=2.0), 1: report(1, 101, rtt_ms=4.0, mtu=1200, drops={"queue_full": 3},
                                                   key_updates=2, sessions=4)}
    st = network_status(net, sup, reports, routes=["198.19.8.0/24"])
    assert st.state is NetworkState.UP
    assert st.counters == {"tun_rx_bytes": 2000, "tun_rx_packets": 20}
    assert st.drops == {"dgram_bad_header": 1, "queue_full": 3}
    assert st.rtt_ms == 3.0
    assert st.mtu == 1200
    assert st.routes == ("198.19.8.0/24",)
    assert st.addresses == ("198.19.0.1/24",) and st.peer_addresses == ("198.19.0.2/24",)
    assert st.port == 4433 and st.interface == "l3p-office"
    assert [q.pid for q in st.queues] == [100, 101]
    assert [q.key_updates for q in st.queues] == [0, 2]
    assert [q.sessions for q in st.queues] == [1, 4]
    # it survives the wire
    reply = status_reply(controller_pid=1, uptime=5.0, node_id="alpha", networks=[st], verbose=True)
    assert CLI_REPLIES.decode_untrusted(CLI_REPLIES.encode(reply)) == reply


def test_report_from_an_old_pid_is_not_counted() -> None:
    net, sup = network(1), running(1)
    st = network_status(net, sup, {0: report(0, 999)})
    assert st.counters == {}
    assert st.state is NetworkState.STARTING
    assert st.queues[0].state is SessionState.STARTING


def test_restarts_and_failure_reason_are_reported() -> None:
    net, sup = network(1), running(1)
    sup.on_exit(100, 1.0, 1)
    st = network_status(net, sup, {})
    assert st.state is NetworkState.DEGRADED
    assert st.last_error == "exited with status 1"
    sup.tick(100.0)
    assert network_status(net, sup, {}).restarts == 1
    sup.on_fatal(0, None, 100.0, "bad key")
    st = network_status(net, sup, {})
    assert st.state is NetworkState.FAILED and "bad key" in st.last_error


def test_not_running_network_is_down() -> None:
    st = network_status(network(), None, {})
    assert st.state is NetworkState.DOWN
    assert [q.state for q in st.queues] == [SessionState.STOPPED, SessionState.STOPPED]
    assert st.mtu == 1280 and st.rtt_ms == 0.0


def test_status_reply_without_verbose_drops_queue_rows() -> None:
    st = network_status(network(), running(), {})
    reply = status_reply(controller_pid=7, uptime=-1.0, node_id="alpha", networks=[st], verbose=False)
    assert reply.networks[0].queues == () and reply.uptime == 0.0


def test_status_shows_the_port_mode() -> None:
    """`l3ptp status` (controller/cli.py): one line with the mode and the port(s); NetworkStatus carries it."""
    from l3ptp.controller.cli import format_status
    from l3ptp.ipc.control_messages import StatusReply
    from tests.support.config_builders import underlay

    for mode, line in (("shared", "  udp ports: shared, 4433 for every queue"),
                       ("per-queue", "  udp ports: per-queue, 4433 + queue index")):
        net = parse_config(config({"office": underlay(office(queues=2), port=4433, ports=mode)})).network("office")
        assert net is not None
        st = network_status(net, NetworkSupervisor("office", net.queues), {})
        reply = StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(st,))
        assert CLI_REPLIES.decode_untrusted(CLI_REPLIES.encode(reply)) == reply
        assert line in format_status(reply).splitlines()
        assert st.ports == mode


def test_status_shows_the_tun_offloads_and_a_kernel_that_refused_them() -> None:
    """`l3ptp status`: a `tun offloads:` line from the workers' counters (docs/worker.md, "TUN offloads"): how
    many queues have them, what they coalesced and split, and where the kernel refused super-packets left to
    its checksum check (the worker verifies there from then on); nothing without the counters."""
    from dataclasses import replace

    from l3ptp.controller.cli import format_status
    from l3ptp.ipc.control_messages import StatusReply

    net = parse_config(config({"office": office(queues=2)})).network("office")
    assert net is not None
    st = network_status(net, NetworkSupervisor("office", net.queues), {})

    def line(counters: dict[str, int]) -> list[str]:
        reply = StatusReply(controller_pid=1, uptime=1.0, node_id="alpha", networks=(replace(st, counters=counters),))
        assert CLI_REPLIES.decode_untrusted(CLI_REPLIES.encode(reply)) == reply
        return [x for x in format_status(reply).splitlines() if x.startswith("  tun offloads:")]

    assert line({}) == []
    assert line({"tun_offload": 0, "tun_gro_writes": 0}) == ["  tun offloads: off"]
    assert line({"tun_offload": 2, "tun_gro_writes": 30, "tun_gro_merged": 900, "tun_gro_fallback": 0}) == [
        "  tun offloads: on for 2 queues; 30 coalesced writes (900 packets)"]
    assert line({"tun_offload": 1, "tun_gro_writes": 3, "tun_gro_merged": 9, "tun_gso_split": 4,
                 "tun_gso_segments": 90, "tun_gro_fallback": 1}) == [
        "  tun offloads: on for 1 queue; 3 coalesced writes (9 packets); 4 super-packets split (90 packets); "
        "the kernel refused unflagged super-packets on 1 queue: checksums verified by the worker there"]
