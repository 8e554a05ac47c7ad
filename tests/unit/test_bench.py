"""Pure helpers of `make bench`: /proc parsing, iperf3/ping results, CPU accounting, ratios, tables."""

from __future__ import annotations

import argparse

import pytest

from lab.bench import baselines, cpu, report, runner

STAT = ("1234 (python3 -m (weird) x) S 1 1234 1234 0 -1 4194560 5000 0 0 0 "
        "250 75 3 4 20 0 1 0 100 123456789 4000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")

STATUS = "Name:\tpython3\nVmPeak:\t  40000 kB\nVmHWM:\t   30000 kB\nVmRSS:\t   25600 kB\nThreads:\t1\n"

PROC_STAT = "cpu  100 5 50 1000 10 2 8 0 0 0\ncpu0 50 2 25 500 5 1 4 0 0 0\nintr 1 2 3\n"


def test_proc_cpu_ticks_sums_utime_and_stime_despite_parentheses_in_comm() -> None:
    assert cpu.proc_cpu_ticks(STAT) == 325


def test_proc_rss_kb() -> None:
    assert cpu.proc_rss_kb(STATUS) == 25600
    assert cpu.proc_rss_kb(STATUS, "VmHWM") == 30000
    assert cpu.proc_rss_kb("Name:\tkthreadd\n") == 0  # kernel threads have no VmRSS


def test_system_ticks() -> None:
    t = cpu.system_ticks(PROC_STAT)
    assert t["user"] == 100 and t["softirq"] == 8 and t["total"] == 100 + 5 + 50 + 1000 + 10 + 2 + 8 + 0
    with pytest.raises(ValueError):
        cpu.system_ticks("cpu0 1 2 3 4 5 6 7 8\n")


def test_cpu_shares_are_percent_of_one_core_over_wall_time() -> None:
    before = cpu.system_ticks("cpu  0 0 0 0 0 0 0 0\n")
    after = cpu.system_ticks("cpu  300 0 60 30 0 5 15 0\n")
    # 2 s at 100 Hz on 2 CPUs: workers 150 ticks = 75% of one core, iperf3 0.5 s = 25%.
    shares = cpu.cpu_shares({"workers": 150, "controller": 2}, before, after, 2, 2.0, {"iperf3": 0.5}, hz=100)
    assert shares["workers"] == pytest.approx(75.0)
    assert shares["controller"] == pytest.approx(1.0)
    assert shares["iperf3"] == pytest.approx(25.0)
    assert shares["kernel irq+softirq"] == pytest.approx(10.0)
    assert shares["idle"] == pytest.approx(15.0)
    assert shares["unaccounted"] == pytest.approx(200.0 - 75 - 1 - 25 - 10 - 15)


def test_cpu_shares_other_never_negative() -> None:
    z = cpu.system_ticks("cpu  0 0 0 0 0 0 0 0\n")
    shares = cpu.cpu_shares({"workers": 500}, z, z, 2, 1.0, hz=100)
    assert shares["workers"] == pytest.approx(500.0) and shares["unaccounted"] == 0.0


def test_others_delta_splits_kernel_threads() -> None:
    before = {1: (100, False), 2: (50, True), 3: (10, False)}
    after = {1: (180, False), 2: (70, True), 4: (30, False)}  # 3 exited (lost), 4 is new (counts whole)
    assert cpu.others_delta(before, after, [1]) == {"kernel threads": 20, "other processes": 30}
    assert cpu.others_delta(before, after, [1, 2, 4]) == {"kernel threads": 0, "other processes": 0}


def test_proc_is_kthread() -> None:
    assert not cpu.proc_is_kthread(STAT)
    kthread = "12 (ksoftirqd/0) S 2 0 0 0 -1 69238848 0 0 0 0 5 90 0 0 20 0 1 0 3 0 0 18446744073709551615"
    assert cpu.proc_is_kthread(kthread)


def test_cpu_per_gb() -> None:
    assert report.cpu_per_gb(3.0, 2_000_000_000) == pytest.approx(1.5)
    assert report.cpu_per_gb(3.0, 0) is None


def test_counter_delta_keeps_nonzero_changes_of_either_side() -> None:
    assert report.counter_delta({"a": 1, "b": 5, "gone": 2}, {"a": 4, "b": 5, "new": 3}) == {"a": 3, "gone": -2, "new": 3}


def test_tcp_summary() -> None:
    result = {"end": {
        "sum_sent": {"seconds": 5.0, "bytes": 1000, "bits_per_second": 2e8, "retransmits": 7},
        "sum_received": {"seconds": 5.0, "bytes": 900, "bits_per_second": 1.5e8},
        "cpu_utilization_percent": {"host_total": 20.0, "remote_total": 30.0},
    }}
    s = report.tcp_summary(result)
    assert s["mbit"] == pytest.approx(150.0)
    assert s["bytes"] == 900 and s["retransmits"] == 7
    assert s["iperf3_cpu_s"] == pytest.approx(2.5)


def test_udp_summary_iperf3_3_12_has_only_sum() -> None:
    result = {"end": {"sum": {"seconds": 2.0, "bits_per_second": 3e8, "packets": 1000, "lost_packets": 250,
                              "lost_percent": 25.0}}}
    s = report.udp_summary(result, length=1000)
    assert s["offered_mbit"] == pytest.approx(300.0)
    assert s["pps"] == pytest.approx(375.0) and s["sent_pps"] == pytest.approx(500.0)
    assert s["mbit"] == pytest.approx(750 * 1000 * 8 / 2 / 1e6)
    assert s["loss_pct"] == 25.0


def test_udp_summary_prefers_sum_received_when_it_has_loss() -> None:
    result = {"end": {"sum": {"seconds": 1.0, "bits_per_second": 1e6, "packets": 10, "lost_packets": 0},
                      "sum_received": {"seconds": 1.0, "packets": 10, "lost_packets": 5, "lost_percent": 50.0}}}
    s = report.udp_summary(result, length=100)
    assert s["loss_pct"] == 50.0 and s["pps"] == 5.0


PING_OK = """PING 198.19.0.2 (198.19.0.2) 56(84) bytes of data.

--- 198.19.0.2 ping statistics ---
20 packets transmitted, 19 received, 5% packet loss, time 969ms
rtt min/avg/max/mdev = 0.512/1.151/3.020/0.400 ms
"""


def test_parse_ping() -> None:
    p = report.parse_ping(PING_OK)
    assert (p["sent"], p["received"]) == (20, 19)
    assert p["avg_ms"] == 1.151 and p["min_ms"] == 0.512 and p["max_ms"] == 3.020


def test_parse_ping_nothing_back() -> None:
    p = report.parse_ping("3 packets transmitted, 0 received, 100% packet loss, time 2000ms\n")
    assert p["received"] == 0 and p["avg_ms"] is None


def test_ratio() -> None:
    assert report.ratio(460.8, 512) == pytest.approx(0.9)
    assert report.ratio(1.0, 0) is None and report.ratio(None, 1.0) is None and report.ratio(1.0, None) is None


def test_fmt_rounds_cell() -> None:
    assert report.fmt_rounds_cell((684.0, 650.0, 700.4), (1.16, 1.0, 1.171)) == "684 [650-700] 1.16x [1.00-1.17]"
    assert report.fmt_rounds_cell((0.5, 0.5, 0.5), None, 2) == "0.50"  # one value: no spread; no ratio
    assert report.fmt_rounds_cell((2.0, 2.0, 2.0), (0.5, 0.5, 0.5), 1) == "2.0 0.50x"
    assert report.fmt_rounds_cell(None, (1.0, 1.0, 1.0)) == "-"


def _config(name: str, tcp1: float, cpu: float | None, rss: dict[str, int], round_no: int = 1) -> dict:
    config = {
        "name": name,
        "round": round_no,
        "tests": {
            "ping": {"avg_ms": 0.5},
            "tcp1": {"mbit": tcp1, "bytes": 2_000_000_000, "retransmits": 0, "pps": 1000.0},
            "tcp4": {"mbit": tcp1 * 2},
            "udp_fixed": {"loss_pct": 1.0, "mbit": 299.0},
            "udp_sat": {"mbit": 400.0, "pps": 40000.0, "sent_pps": 80000.0, "loss_pct": 50.0},
        },
        "tunnel_cpu_s": cpu,
        "rss_kb": rss,
    }
    config["summary"] = report.summarize(config)
    return config


def test_summarize() -> None:
    c = _config("l3ptp q=1 aioquic", 200.0, 4.0,
                {"a.helper": 30 * 1024, "b.helper": 31 * 1024, "a.worker0": 40 * 1024, "b.worker1": 50 * 1024,
                 "a.controller": 60 * 1024})
    s = c["summary"]
    assert s["cpu_s_per_gb"] == pytest.approx(2.0)
    assert s["max_worker_rss_mb"] == pytest.approx(50.0)  # the controller is neither a worker nor a helper
    assert s["helper_rss_mb"] == pytest.approx(31.0)
    assert s["udp_sat_loss_pct"] == 50.0 and s["tcp4_mbit"] == 400.0


def test_summarize_without_tunnel_processes() -> None:
    s = _config("veth", 10000.0, None, {})["summary"]
    assert s["cpu_s_per_gb"] is None and s["max_worker_rss_mb"] is None and s["helper_rss_mb"] is None


def test_aggregate_takes_medians_spreads_and_round_by_round_ratios() -> None:
    results = []
    # Interleaved as the runner does it: every configuration once per round.
    for r, (ovpn, l3) in enumerate(((400.0, 500.0), (300.0, 450.0), (500.0, 400.0)), start=1):
        results.append(_config("openvpn", ovpn, 8.0, {"a.daemon": 10 * 1024}, r))
        results.append(_config("l3ptp q=1 qh3", l3, 4.0, {"a.worker0": 40 * 1024}, r) | {"mtu": 1280})
    results.append({"name": "wireguard-go", "round": 1, "error": "did not come up"})
    aggs = {a["name"]: a for a in report.aggregate(results)}
    l3 = aggs["l3ptp q=1 qh3"]
    assert l3["rounds"] == 3 and l3["failed"] == 0 and l3["mtu"] == 1280
    assert l3["summary"]["tcp1_mbit"] == (450.0, 400.0, 500.0)
    # Ratios per round (1.25, 1.5, 0.8), not the ratio of the medians (450 / 400 = 1.125).
    assert l3["ratio"]["tcp1_mbit"] == pytest.approx((1.25, 0.8, 1.5))
    assert aggs["openvpn"]["ratio"]["tcp1_mbit"] == (1.0, 1.0, 1.0)
    assert aggs["wireguard-go"]["rounds"] == 0 and aggs["wireguard-go"]["failed"] == 1
    assert list(aggs) == ["openvpn", "l3ptp q=1 qh3", "wireguard-go"]


def test_aggregate_leaves_out_ratios_of_rounds_without_the_reference() -> None:
    results = [_config("openvpn", 400.0, 8.0, {}, 1), _config("l3ptp q=1 qh3", 200.0, 4.0, {}, 1),
               {"name": "openvpn", "round": 2, "error": "no ping reply"}, _config("l3ptp q=1 qh3", 300.0, 4.0, {}, 2)]
    aggs = {a["name"]: a for a in report.aggregate(results)}
    assert aggs["l3ptp q=1 qh3"]["summary"]["tcp1_mbit"] == (250.0, 200.0, 300.0)
    assert aggs["l3ptp q=1 qh3"]["ratio"]["tcp1_mbit"] == (0.5, 0.5, 0.5)  # round 2 had no openvpn figure
    assert aggs["openvpn"]["rounds"] == 1 and aggs["openvpn"]["failed"] == 1
    veth = report.aggregate([_config("veth", 10000.0, None, {})])[0]
    assert "cpu_s_per_gb" not in veth["summary"] and veth["ratio"] == {}  # no reference in the run: no ratios


def test_render_rounds_table() -> None:
    results = [_config("veth", 10000.0, None, {}, 1) | {"mtu": 1500},
               _config("openvpn", 400.0, 8.0, {"a.daemon": 10 * 1024, "b.daemon": 9 * 1024}, 1) | {"mtu": 1500},
               _config("l3ptp q=1 aioquic", 200.0, 4.0, {"a.worker0": 40 * 1024, "a.helper": 30 * 1024}, 1),
               {"name": "wireguard-go", "round": 1, "error": "did not come up"},
               _config("openvpn", 600.0, 8.0, {"a.daemon": 10 * 1024, "b.daemon": 9 * 1024}, 2) | {"mtu": 1500},
               _config("l3ptp q=1 aioquic", 240.0, 4.0, {"a.worker0": 40 * 1024, "a.helper": 30 * 1024}, 2),
               {"name": "l3ptp q=1 aioquic", "round": 3, "error": "tunnel did not come up"}]
    table = report.render_rounds_table(report.aggregate(results))
    lines = table.splitlines()
    assert lines[0].startswith("| configuration") and "TCP x1 Mbit/s" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    openvpn = next(line for line in lines if line.startswith("| openvpn (MTU 1500)"))
    assert "500 [400-600] 1.00x |" in openvpn and "10.0 1.00x" in openvpn
    l3 = next(line for line in lines if line.startswith("| l3ptp q=1 aioquic (2 of 3 rounds)"))
    assert "220 [200-240] 0.45x [0.40-0.50]" in l3 and "30.0 |" in l3
    veth = next(line for line in lines if line.startswith("| veth (MTU 1500)"))
    assert "10000 25.00x" in veth and " - |" in veth
    assert "failed" in next(line for line in lines if line.startswith("| wireguard-go (0 of 1 rounds)"))
    assert len({len(line) for line in lines}) == 1  # aligned


def test_runner_interleaves_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(runner, "run_config",
                        lambda name, body, *, lab_kwargs, results, round_no: calls.append((round_no, name)) or True)
    monkeypatch.setattr(runner, "say", lambda line: None)
    plans = [("openvpn", None, {}), ("l3ptp q=1 qh3", None, {})]
    assert runner.run_rounds(plans, 2, []) is True  # type: ignore[arg-type]
    assert calls == [(1, "openvpn"), (1, "l3ptp q=1 qh3"), (2, "openvpn"), (2, "l3ptp q=1 qh3")]


def test_baselines_at_their_defaults_and_at_the_equal_mtu() -> None:
    assert baselines.baseline_kind("openvpn") == ("openvpn", None)
    assert baselines.baseline_kind("wireguard-go@1280") == ("wireguard-go", 1280)
    assert {"openvpn", "openvpn@1280", "wireguard-go", "wireguard-go@1280"} <= set(baselines.BASELINES)
    assert runner.build_parser().parse_args([]).baselines == list(baselines.BASELINES)


def test_render_bottleneck() -> None:
    c = _config("l3ptp q=2 qh3", 200.0, 4.0, {})
    c["ncpu"] = 2
    c["cpu_shares_tcp1"] = {"l3ptp workers": 150.0, "idle": 10.0, "iperf3": 20.0}
    c["cpu_per_process_tcp1"] = {"a.worker0": 90.0, "b.worker0": 60.0}
    c["rss_kb"] = {"a.controller": 51200}
    c["l3ptp"] = {"udp_sat": {
        "a": {"counters": {"tun_rx_packets": 100, "dgram_tx_packets": 60}, "drops": {"queue_full": 40},
              "seq_lost": 0, "max_queue_depth": 256},
        "b": {"counters": {"dgram_rx_packets": 58, "tun_tx_packets": 58}, "drops": {}, "seq_lost": 2,
              "max_queue_depth": 0},
    }}
    text = report.render_bottleneck(c)
    assert text.startswith("### l3ptp q=2 qh3")
    assert "l3ptp workers 150, iperf3 20, idle 10" in text  # largest first
    assert "a.worker0 90" in text and "a.controller 50.0" in text
    assert "queue_full 40" in text and "max queue depth 256" in text and "seq lost 2" in text
    assert "tun rx 100" in text and "no drops" in text


def test_category() -> None:
    assert cpu._category("a.worker1") == "l3ptp workers"
    assert cpu._category("b.controller") == "l3ptp controller"
    assert cpu._category("a.helper") == "l3ptp helper"
    assert cpu._category("b.daemon") == "tunnel daemons"


def test_list_option_parsing() -> None:
    parse = runner._list(int, range(1, 9))
    assert parse("1,2, 2") == [1, 2]
    with pytest.raises(argparse.ArgumentTypeError):
        parse("0,9")
    engines = runner._list(str, runner.ENGINES)
    assert engines("qh3,aioquic") == ["qh3", "aioquic"]
    assert runner._list(str, baselines.BASELINES)("none") == []
    with pytest.raises(argparse.ArgumentTypeError):
        runner._list(str, baselines.BASELINES)(",")
    args = runner.build_parser().parse_args(["--queues", "1,2", "--engine", "aioquic", "--baselines", "veth"])
    assert args.queues == [1, 2] and args.engine == ["aioquic"] and args.baselines == ["veth"]
    assert args.seconds == 5.0 and args.udp_rate == "300M" and args.rounds == 3


def test_l3ptp_runs_at_1280_and_at_auto() -> None:
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "qh3"])
    assert args.mtu == ["1280", "auto"]
    plans = runner.plan_l3ptp(args, [])
    assert [(name, kw) for name, _body, kw in plans] == [
        ("l3ptp q=1 qh3", {"queues": 1, "engine": "qh3", "config_a": None, "config_b": None}),
        ("l3ptp@auto q=1 qh3", {"queues": 1, "engine": "qh3", "config_a": {"mtu": "auto"},
                                "config_b": {"mtu": "auto"}}),
    ]
    only = runner.build_parser().parse_args(["--mtu", "auto"])
    assert only.mtu == ["auto"]
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["--mtu", "1400"])


def test_l3ptp_runs_with_and_without_tun_offloads() -> None:
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "qh3", "--mtu", "1280"])
    assert args.offload == ["gro"]  # the product's default, which the unnamed row runs without setting it
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "qh3", "--mtu", "1280",
                                             "--offload", "gro,off,auto"])
    assert [(name, kw) for name, _body, kw in runner.plan_l3ptp(args, [])] == [
        ("l3ptp q=1 qh3", {"queues": 1, "engine": "qh3", "config_a": None, "config_b": None}),
        ("l3ptp q=1 qh3 offload=off", {"queues": 1, "engine": "qh3", "config_a": {"offload": "off"},
                                       "config_b": {"offload": "off"}}),
        ("l3ptp q=1 qh3 offload=auto", {"queues": 1, "engine": "qh3", "config_a": {"offload": "auto"},
                                        "config_b": {"offload": "auto"}}),
    ]
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["--offload", "on"])


def test_l3ptp_runs_to_the_overlay_address_and_to_the_routed_one() -> None:
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "qh3", "--mtu", "1280"])
    assert args.to == ["overlay"]
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "qh3", "--mtu", "1280",
                                             "--offload", "off", "--to", "overlay,routed"])
    assert [name for name, _body, _kw in runner.plan_l3ptp(args, [])] == [
        "l3ptp q=1 qh3 offload=off", "l3ptp q=1 qh3 offload=off routed"]
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["--to", "underlay"])


def test_l3ptp_runs_on_asyncio_and_on_uvloop() -> None:
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "aioquic", "--mtu", "1280"])
    assert args.event_loop == ["auto"]
    args = runner.build_parser().parse_args(["--queues", "1", "--engine", "aioquic", "--mtu", "1280",
                                             "--event-loop", "auto,uvloop"])
    assert [(name, kw) for name, _body, kw in runner.plan_l3ptp(args, [])] == [
        ("l3ptp q=1 aioquic", {"queues": 1, "engine": "aioquic", "config_a": None, "config_b": None}),
        ("l3ptp q=1 aioquic uvloop", {"queues": 1, "engine": "aioquic", "config_a": {"event_loop": "uvloop"},
                                      "config_b": {"event_loop": "uvloop"}}),
    ]
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["--event-loop", "trio"])
