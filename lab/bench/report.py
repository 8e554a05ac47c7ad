"""The benchmark's figures: iperf3 and ping results, a configuration's summary, the tables."""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tabulate import tabulate

from lab.bench.common import UDP_LEN

__all__ = ["COLUMNS", "DETAIL_COLUMNS", "REFERENCE", "aggregate", "counter_delta", "cpu_per_gb", "fmt_rounds_cell",
           "parse_ping", "ratio", "render_bottleneck", "render_rounds_table", "summarize", "tcp_summary", "udp_summary"]

REFERENCE = "openvpn"


def cpu_per_gb(cpu_seconds: float, nbytes: int) -> float | None:
    """CPU seconds per 1e9 bytes moved; None when nothing moved."""
    return cpu_seconds / (nbytes / 1e9) if nbytes > 0 else None


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """after - before per key (keys of either); zero deltas left out."""
    out = {}
    for key in sorted(set(before) | set(after)):
        d = int(after.get(key, 0)) - int(before.get(key, 0))
        if d:
            out[key] = d
    return out


def tcp_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Throughput, bytes and retransmits of an iperf3 TCP JSON result."""
    end = result["end"]
    recv, sent = end["sum_received"], end["sum_sent"]
    cpu = end.get("cpu_utilization_percent", {})
    seconds = float(recv.get("seconds") or sent.get("seconds") or 0.0)
    return {
        "mbit": float(recv["bits_per_second"]) / 1e6,
        "bytes": int(recv["bytes"]),
        "seconds": seconds,
        "retransmits": int(sent.get("retransmits", 0)),
        "iperf3_cpu_s": (float(cpu.get("host_total", 0.0)) + float(cpu.get("remote_total", 0.0))) / 100.0 * seconds,
    }


def udp_summary(result: Mapping[str, Any], length: int = UDP_LEN) -> dict[str, Any]:
    """Received rate, received packets/s and loss of an iperf3 UDP JSON result.

    iperf3 3.12 reports the sender's rate in end.sum plus the receiver's
    loss; newer ones add end.sum_received. Received = sent - lost.
    """
    end = result["end"]
    s = end.get("sum_received") if "lost_packets" in end.get("sum_received", {}) else end["sum"]
    s = s or end["sum"]
    packets, lost = int(s.get("packets", 0)), int(s.get("lost_packets", 0))
    seconds = float(s.get("seconds") or 0.0) or 1.0
    received = max(packets - lost, 0)
    return {
        "offered_mbit": float(end["sum"]["bits_per_second"]) / 1e6,
        "mbit": received * length * 8 / seconds / 1e6,
        "pps": received / seconds,
        "sent_pps": packets / seconds,
        "loss_pct": float(s.get("lost_percent", 100.0 * lost / packets if packets else 0.0)),
        "packets": packets,
        "lost": lost,
    }


_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_PING_LOSS = re.compile(r"(\d+) packets transmitted, (\d+) received")


def parse_ping(stdout: str) -> dict[str, Any]:
    """avg/min/max RTT (ms) and loss from iputils ping output; avg None if nothing came back."""
    out: dict[str, Any] = {"avg_ms": None, "min_ms": None, "max_ms": None, "sent": 0, "received": 0}
    m = _PING_LOSS.search(stdout)
    if m:
        out["sent"], out["received"] = int(m.group(1)), int(m.group(2))
    m = _PING_RTT.search(stdout)
    if m:
        out["min_ms"], out["avg_ms"], out["max_ms"] = float(m.group(1)), float(m.group(2)), float(m.group(3))
    return out


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


#: (column title, key in a configuration's `summary`, digits)
COLUMNS = (
    ("TCP x1 Mbit/s", "tcp1_mbit", 0),
    ("TCP x4 Mbit/s", "tcp4_mbit", 0),
    ("UDP fixed loss %", "udp_fixed_loss_pct", 2),
    ("UDP sat Mbit/s", "udp_sat_mbit", 0),
    ("ping ms", "ping_ms", 3),
    ("ping@5ms ms", "ping_busy_ms", 3),
    ("CPU s/GB", "cpu_s_per_gb", 1),
    ("max worker RSS MB", "max_worker_rss_mb", 1),
    ("helper RSS MB", "helper_rss_mb", 1),
)

DETAIL_COLUMNS = (
    ("TCP x1 pps", "tcp1_pps", 0),
    ("TCP x1 retr", "tcp1_retransmits", 0),
    ("UDP fixed Mbit/s", "udp_fixed_mbit", 0),
    ("UDP sat pps", "udp_sat_pps", 0),
    ("UDP sat loss %", "udp_sat_loss_pct", 1),
    ("UDP sat sent pps", "udp_sat_sent_pps", 0),
    ("tunnel CPU s (TCP x1)", "tunnel_cpu_s", 2),
)


def _grid(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown (pipe) table: the first column left-aligned, the figures right-aligned."""
    return tabulate([list(r) for r in rows], headers=list(header), tablefmt="pipe", disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(header) - 1))


def render_bottleneck(config: Mapping[str, Any]) -> str:
    """The l3ptp bottleneck section of one configuration: CPU shares, drops, queues, loss."""
    lines = [f"### {config['name']} (a = sender, iperf3 client; b = receiver)"]
    shares = config.get("cpu_shares_tcp1") or {}
    if shares:
        lines.append("CPU during TCP x1, % of one core (the machine has "
                     f"{config.get('ncpu', '?')} x 100%): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    rss = config.get("rss_kb") or {}
    if rss:
        lines.append("  peak RSS MB seen: " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in rss.items()))
    per_proc = config.get("cpu_per_process_tcp1") or {}
    if per_proc:
        lines.append("  per process: " + ", ".join(f"{k} {v:.0f}" for k, v in per_proc.items()))
    for test, data in (config.get("l3ptp") or {}).items():
        parts = []
        for host in ("a", "b"):
            h = data.get(host, {})
            c = h.get("counters", {})
            traffic = (f"tun rx {c.get('tun_rx_packets', 0)} tx {c.get('tun_tx_packets', 0)}, "
                       f"dgram rx {c.get('dgram_rx_packets', 0)} tx {c.get('dgram_tx_packets', 0)}")
            drops = ", ".join(f"{k} {v}" for k, v in h.get("drops", {}).items()) or "no drops"
            parts.append(f"{host}: {traffic}; {drops}; seq lost {h.get('seq_lost', 0)}; "
                         f"max queue depth {h.get('max_queue_depth', '-')}")
        lines.append(f"  {test}: " + " | ".join(parts))
    return "\n".join(lines)


def summarize(config: Mapping[str, Any]) -> dict[str, Any]:
    """The table's figures of one configuration's raw results."""
    t = config.get("tests", {})
    s: dict[str, Any] = {}
    if "tcp1" in t:
        s["tcp1_mbit"] = t["tcp1"]["mbit"]
        s["tcp1_retransmits"] = t["tcp1"]["retransmits"]
        s["tcp1_pps"] = t["tcp1"].get("pps")
    if "tcp4" in t:
        s["tcp4_mbit"] = t["tcp4"]["mbit"]
    if "udp_fixed" in t:
        s["udp_fixed_loss_pct"] = t["udp_fixed"]["loss_pct"]
        s["udp_fixed_mbit"] = t["udp_fixed"]["mbit"]
    if "udp_sat" in t:
        s["udp_sat_mbit"] = t["udp_sat"]["mbit"]
        s["udp_sat_pps"] = t["udp_sat"]["pps"]
        s["udp_sat_sent_pps"] = t["udp_sat"]["sent_pps"]
        s["udp_sat_loss_pct"] = t["udp_sat"]["loss_pct"]
    if "ping" in t:
        s["ping_ms"] = t["ping"]["avg_ms"]
    if "ping_busy" in t:
        s["ping_busy_ms"] = t["ping_busy"]["avg_ms"]
    cpu = config.get("tunnel_cpu_s")
    s["tunnel_cpu_s"] = cpu
    s["cpu_s_per_gb"] = cpu_per_gb(cpu, t["tcp1"]["bytes"]) if cpu and "tcp1" in t else None
    rss = config.get("rss_kb", {})
    workers = [v for k, v in rss.items() if k.split(".", 1)[-1].startswith(("worker", "daemon"))]
    helpers = [v for k, v in rss.items() if k.split(".", 1)[-1] == "helper"]
    s["max_worker_rss_mb"] = max(workers) / 1024 if workers else None
    s["helper_rss_mb"] = max(helpers) / 1024 if helpers else None
    return s


def _median_spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, lowest, highest); None for no values."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def aggregate(results: Sequence[Mapping[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Per configuration (in first-seen order), over its rounds: every summary figure as (median, lowest,
    highest), and its ratio to `reference`'s figure of the same round as (median, lowest, highest).

    A ratio is taken round by round (both measured minutes apart, on the same machine state) and only
    where both figures exist; a failed round counts in `failed` and adds no figure.
    """
    ref_by_round = {c.get("round", 1): c.get("summary", {}) for c in results
                    if c["name"] == reference and c.get("summary")}
    out: dict[str, dict[str, Any]] = {}
    for c in results:
        agg = out.setdefault(c["name"], {"name": c["name"], "rounds": 0, "failed": 0, "mtu": c.get("mtu"),
                                         "_values": {}, "_ratios": {}})
        summary = c.get("summary")
        if c.get("error") or not summary:
            agg["failed"] += 1
            continue
        agg["rounds"] += 1
        agg["mtu"] = agg["mtu"] or c.get("mtu")
        ref = ref_by_round.get(c.get("round", 1), {})
        for key, value in summary.items():
            if value is None:
                continue
            agg["_values"].setdefault(key, []).append(float(value))
            r = ratio(value, ref.get(key))
            if r is not None:
                agg["_ratios"].setdefault(key, []).append(r)
    for agg in out.values():
        agg["summary"] = {k: _median_spread(v) for k, v in agg.pop("_values").items()}
        agg["ratio"] = {k: _median_spread(v) for k, v in agg.pop("_ratios").items()}
    return list(out.values())


def fmt_rounds_cell(figure: tuple[float, float, float] | None, rel: tuple[float, float, float] | None,
                    digits: int = 0) -> str:
    """'684 [650-700] 1.16x [1.00-1.17]': median [lowest-highest], then the ratio the same way;
    a spread is left out when it is a single value, the ratio when it is undefined; '-' for no figure."""
    if figure is None:
        return "-"

    def one(t: tuple[float, float, float], d: int, unit: str = "") -> str:
        text = f"{t[0]:.{d}f}{unit}"
        lo, hi = f"{t[1]:.{d}f}", f"{t[2]:.{d}f}"
        return text if lo == hi else f"{text} [{lo}-{hi}]"

    text = one(figure, digits)
    return f"{text} {one(rel, 2, 'x')}" if rel is not None else text


def render_rounds_table(aggregated: Sequence[Mapping[str, Any]],
                        columns: Sequence[tuple[str, str, int]] = COLUMNS) -> str:
    """A Markdown table of `aggregate`'s output, one row per configuration (with its MTU and, when some
    rounds failed, how many of them it has)."""
    rows = []
    for a in aggregated:
        label = a["name"] + (f" (MTU {a['mtu']})" if a.get("mtu") else "")
        if a["failed"]:
            label += f" ({a['rounds']} of {a['rounds'] + a['failed']} rounds)"
        if not a["rounds"]:
            rows.append([label, "failed"] + [""] * (len(columns) - 1))
            continue
        rows.append([label] + [fmt_rounds_cell(a["summary"].get(key), a["ratio"].get(key), digits)
                               for _, key, digits in columns])
    return _grid(["configuration", *(title for title, _, _ in columns)], rows)
