"""`make bench`: l3ptp against plain veth, OpenVPN and wireguard-go, on one box.

Root only. Every configuration runs on the lab's two-namespace topology
(host A and host B joined by a veth underlay in 198.18.0.0/16) and goes
through the same tests, client on A, server on B:

* ping, 20 packets 0.05 s apart (average RTT), and 200 packets 5 ms apart;
* iperf3 TCP, one stream: throughput, and the CPU time of the tunnel
  processes of both ends (utime + stime from /proc/<pid>/stat) per GB moved;
  during this run /proc/stat and iperf3's own CPU figures give the
  per-process CPU shares of the bottleneck section;
* iperf3 TCP, four streams (-P 4);
* iperf3 UDP at a fixed offered rate (default 300 Mbit/s): loss;
* iperf3 UDP at saturation (-b 0): received rate, packets/s and loss.

The configurations: `veth` (no tunnel, iperf3 to the underlay address),
`openvpn` (OpenVPN 2.6, point-to-point TLS mode, AES-256-GCM, UDP, a
throwaway CA made here), `wireguard-go` (keys and peer set with `wg`), and
l3ptp for each queue count x QUIC engine asked for. Figures are printed as
ratios against OpenVPN measured in the same run; nothing is asserted.

Every process started here is stopped by PID; each lab is closed (namespaces,
links and its work directory removed) after its configuration, also on a
failure or Ctrl-C, and what is left behind is checked.

Exit status: 0 all configurations measured, 1 one or more failed, 2 usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BenchError",
    "cpu_shares",
    "fmt_cell",
    "main",
    "parse_ping",
    "proc_cpu_ticks",
    "proc_rss_kb",
    "ratio",
    "render_bottleneck",
    "render_table",
]

BASELINES = ("veth", "openvpn", "wireguard-go")
ENGINES = ("aioquic", "qh3", "auto")
REFERENCE = "openvpn"
OVPN_ADDR = ("198.19.1.1", "198.19.1.2")
WG_ADDR = ("198.19.2.1", "198.19.2.2")
WG_PREFIXLEN = 24
TUNNEL_MTU = 1280  # l3ptp's; the baselines' tunnels get the same inner MTU
OVPN_PORT = 1194
WG_PORT = 51820
UDP_LEN = 1200
#: Debian package -> program it provides, per baseline.
PACKAGES = {"openvpn": {"openvpn": "openvpn"},
            "wireguard-go": {"wireguard-go": "wireguard-go", "wireguard-tools": "wg"}}


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def _say(line: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {line}", flush=True)


#: Installed by main(); `_checkpoint()` between steps.
_interrupts: Any = None


def _checkpoint() -> None:
    """Stop at the next step after Ctrl-C/SIGTERM, even if its exception was swallowed."""
    if _interrupts is not None:
        _interrupts.check()


# ---- pure helpers: /proc parsing, iperf3/ping results, ratios, tables ----------------------


def proc_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat."""
    fields = stat_text.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def proc_rss_kb(status_text: str, key: str = "VmRSS") -> int:
    """VmRSS (or another Vm* line) in kB from the text of /proc/<pid>/status; 0 if absent."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def system_ticks(stat_text: str) -> dict[str, int]:
    """The aggregate `cpu` line of /proc/stat as named tick counts plus `total`."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]
            out = dict(zip(names, values))
            out["total"] = sum(values)
            return out
    raise ValueError("no aggregate cpu line in /proc/stat")


def cpu_shares(
    proc_ticks: Mapping[str, int],
    sys_before: Mapping[str, int],
    sys_after: Mapping[str, int],
    ncpu: int,
    wall_s: float,
    extra_seconds: Mapping[str, float] | None = None,
    hz: int = 100,
) -> dict[str, float]:
    """Where the CPU went over a window of `wall_s` seconds, in % of one core (like top).

    `proc_ticks` are per-category process tick deltas (e.g. workers,
    controller); `extra_seconds` are CPU seconds known another way (iperf3's
    own report). Adds `kernel irq+softirq` and `idle` from /proc/stat and
    what remains of ncpu*100 (processes not seen, unattributed
    kernel time), named `unaccounted`. Wall time, not the /proc/stat total, is the denominator:
    on a VM whose vCPUs the host deschedules, /proc/stat misses ticks that
    the per-process runtimes still count.
    """
    scale = 100.0 / (max(wall_s, 1e-9) * hz)
    out = {name: ticks * scale for name, ticks in proc_ticks.items()}
    for name, seconds in (extra_seconds or {}).items():
        out[name] = seconds * hz * scale
    irq = (sys_after["irq"] - sys_before["irq"]) + (sys_after["softirq"] - sys_before["softirq"])
    idle = (sys_after["idle"] - sys_before["idle"]) + (sys_after["iowait"] - sys_before["iowait"])
    out["kernel irq+softirq"] = irq * scale
    out["idle"] = idle * scale
    out["unaccounted"] = max(ncpu * 100.0 - sum(out.values()), 0.0)
    return out


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


def fmt_cell(value: float | None, base: float | None, digits: int = 0, *, with_ratio: bool = True) -> str:
    """'512 (0.90x)'; '-' for a missing value; the ratio left out when it is undefined."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    r = ratio(value, base) if with_ratio else None
    return f"{text} ({r:.2f}x)" if r is not None else text


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
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                       for i, c in enumerate(r)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def render_table(configs: Sequence[Mapping[str, Any]], reference: str = REFERENCE,
                 columns: Sequence[tuple[str, str, int]] = COLUMNS) -> str:
    """A Markdown table, one row per configuration, each figure with its ratio to `reference`'s."""
    ref = next((c.get("summary", {}) for c in configs if c["name"] == reference), {})
    rows = []
    for c in configs:
        s = c.get("summary", {})
        if c.get("error") and not s:
            rows.append([c["name"]] + ["failed"] + [""] * (len(columns) - 1))
            continue
        rows.append([c["name"]] + [fmt_cell(s.get(key), ref.get(key), digits) for _, key, digits in columns])
    return _grid(["configuration", *(title for title, _, _ in columns)], rows)


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


# ---- /proc readers -------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def ticks_of(pids: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[name] = proc_cpu_ticks(_read(f"/proc/{pid}/stat"))
    return out


PF_KTHREAD = 0x00200000


def proc_is_kthread(stat_text: str) -> bool:
    """Is this /proc/<pid>/stat a kernel thread's (PF_KTHREAD in the flags field)?"""
    return bool(int(stat_text.rsplit(")", 1)[1].split()[6]) & PF_KTHREAD)


def all_ticks() -> dict[int, tuple[int, bool]]:
    """(utime + stime, kernel thread?) of every process now, for "other" CPU use during a window."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = _read(f"/proc/{entry}/stat")
                out[int(entry)] = (proc_cpu_ticks(text), proc_is_kthread(text))
    return out


def others_delta(before: Mapping[int, tuple[int, bool]], after: Mapping[int, tuple[int, bool]],
                 ours: Iterable[int]) -> dict[str, int]:
    """Ticks used in the window by processes not in `ours`, split into kernel threads and other processes.

    New processes count whole; those that exited in the window are lost.
    """
    mine = set(ours)
    out = {"kernel threads": 0, "other processes": 0}
    for pid, (t, kthread) in after.items():
        if pid not in mine:
            out["kernel threads" if kthread else "other processes"] += max(t - before.get(pid, (0, kthread))[0], 0)
    return out


def rss_of(pids: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError):
            out[name] = proc_rss_kb(_read(f"/proc/{pid}/status"))
    return out


def _category(name: str) -> str:
    """'a.worker1' -> 'workers', 'b.controller' -> 'controller', 'a.daemon' -> 'tunnel daemons'."""
    role = name.split(".", 1)[-1]
    if role.startswith("worker"):
        return "l3ptp workers"
    if role.startswith("daemon"):
        return "tunnel daemons"
    return f"l3ptp {role}"


# ---- packages ------------------------------------------------------------------------------


def ensure_packages(baselines: Sequence[str], skip_install: bool) -> None:
    """Install the Debian packages of the asked baselines that are missing (unless --skip-install)."""
    missing = [pkg for b in baselines for pkg, prog in PACKAGES.get(b, {}).items() if shutil.which(prog) is None]
    for prog in ("iperf3", "ping"):
        if shutil.which(prog) is None:
            missing.append({"ping": "iputils-ping"}.get(prog, prog))
    if not missing:
        return
    if skip_install:
        raise BenchError(f"missing Debian packages {', '.join(missing)} (and --skip-install was given)")
    _say(f"installing missing Debian packages: {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv, timeout in ((["apt-get", "update", "-qq"], 300),
                          (["apt-get", "install", "-y", "-qq", *missing], 600)):
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed ({res.returncode}): {(res.stderr or res.stdout)[-1000:]}")


# ---- background daemons inside a lab host --------------------------------------------------


class Daemons:
    """Baseline daemons started in the lab's namespaces (`Lab.spawn`); stopped by PID (TERM, then KILL)."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.procs: list[tuple[Any, str]] = []

    def start(self, host: Any, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self.lab.spawn(host, name, argv, env=env)
        self.procs.append((host, name))
        return proc

    def log(self, host: Any, name: str) -> str:
        try:
            return _read(host.logs[name])
        except (OSError, KeyError):
            return ""

    def stop_all(self) -> None:
        for host, name in reversed(self.procs):
            self.lab.stop_process(host, name, wait=10)
            host.procs.pop(name, None)
        self.procs.clear()


def _wait_for(what: str, check: Callable[[], bool], timeout: float, procs: Sequence[subprocess.Popen[bytes]] = (),
              logs: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.pid} exited with {p.returncode}:\n{logs()[-2000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout:g}s:\n{logs()[-2000:]}")
        time.sleep(0.1)


def make_pki(directory: str) -> dict[str, str]:
    """A throwaway EC CA and a server (A) and client (B) certificate; paths of the PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("l3ptp-bench-ca")).issuer_name(name("l3ptp-bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": os.path.join(directory, "ca.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for who, eku in (("a", ExtendedKeyUsageOID.SERVER_AUTH), ("b", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"l3ptp-bench-{who}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=True,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[f"{who}.crt"] = os.path.join(directory, f"{who}.crt")
        paths[f"{who}.key"] = os.path.join(directory, f"{who}.key")
        with open(paths[f"{who}.crt"], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(paths[f"{who}.key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return paths


def start_openvpn(lab: Any, daemons: Daemons, timeout: float) -> tuple[str, str, dict[str, int]]:
    """OpenVPN 2.6 p2p TLS (A tls-server, B tls-client), AES-256-GCM over UDP; (dst, iface, pids)."""
    pki_dir = os.path.join(lab.workdir, "pki")
    os.makedirs(pki_dir, mode=0o700)
    pki = make_pki(pki_dir)
    iface = f"ovpn{lab.tag}"
    procs = []
    for i, (host, peer) in enumerate(((lab.a, lab.b), (lab.b, lab.a))):
        who = host.name
        argv = ["openvpn", "--dev", iface, "--dev-type", "tun", "--proto", "udp",
                "--local", host.underlay, "--port", str(OVPN_PORT), "--remote", peer.underlay, str(OVPN_PORT),
                "--ifconfig", OVPN_ADDR[i], OVPN_ADDR[1 - i],
                "--tls-server" if who == "a" else "--tls-client",
                "--ca", pki["ca"], "--cert", pki[f"{who}.crt"], "--key", pki[f"{who}.key"],
                "--remote-cert-tls", "client" if who == "a" else "server",
                "--data-ciphers", "AES-256-GCM", "--data-ciphers-fallback", "AES-256-GCM",
                "--tun-mtu", str(TUNNEL_MTU), "--disable-dco", "--auth-nocache",
                "--script-security", "0", "--ping", "2", "--verb", "3"]
        if who == "a":
            argv += ["--dh", "none"]
        procs.append(daemons.start(host, "openvpn", argv))

    def ready() -> bool:
        return all("Initialization Sequence Completed" in daemons.log(h, "openvpn") for h in (lab.a, lab.b))

    _wait_for("openvpn", ready, timeout, procs, lambda: daemons.log(lab.a, "openvpn") + daemons.log(lab.b, "openvpn"))
    cipher = re.findall(r"Data Channel: cipher '([^']+)'", daemons.log(lab.a, "openvpn"))
    if cipher and cipher[-1] != "AES-256-GCM":
        raise BenchError(f"openvpn negotiated {cipher[-1]}, not AES-256-GCM")
    return OVPN_ADDR[1], iface, {"a.daemon": procs[0].pid, "b.daemon": procs[1].pid}


def _wg_key() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


def _link_exists(host: Any, ifname: str) -> bool:
    from l3ptp.controller.lab import netlink

    with netlink(host.netns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def start_wireguard(lab: Any, daemons: Daemons, timeout: float) -> tuple[str, str, dict[str, int]]:
    """wireguard-go on both hosts, keys and peer with `wg set`, address/MTU/up with pyroute2."""
    from l3ptp.controller.lab import netlink

    keys = {h: _wg_key() for h in "ab"}
    pids = {}
    for i, (host, peer) in enumerate(((lab.a, lab.b), (lab.b, lab.a))):
        iface = f"wg{lab.tag}{host.name}"  # unique: the UAPI socket path is not per namespace
        proc = daemons.start(host, "wireguard-go", ["wireguard-go", "-f", iface],
                             env={"WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"})
        pids[f"{host.name}.daemon"] = proc.pid
        _wait_for("wireguard-go", lambda: _link_exists(host, iface) and os.path.exists(f"/var/run/wireguard/{iface}.sock"),
                  timeout, [proc], lambda: daemons.log(host, "wireguard-go"))
        key_path = os.path.join(lab.workdir, f"wg-{host.name}.key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(keys[host.name][0] + "\n")
        peer_net = WG_ADDR[1 - i].rsplit(".", 1)[0] + ".0/24"
        lab.run(host, ["wg", "set", iface, "listen-port", str(WG_PORT), "private-key", key_path,
                       "peer", keys[peer.name][1], "endpoint", f"{peer.underlay}:{WG_PORT}",
                       "allowed-ips", peer_net], timeout=15)
        with netlink(host.netns) as ipr:
            idx = ipr.link_lookup(ifname=iface)[0]
            ipr.addr("add", index=idx, address=WG_ADDR[i], prefixlen=WG_PREFIXLEN)
            ipr.link("set", index=idx, mtu=TUNNEL_MTU, state="up")
    return WG_ADDR[1], f"wg{lab.tag}a", pids


# ---- running the tests ---------------------------------------------------------------------


class Poller:
    """Calls `fn` every `interval` s in a thread until stopped (l3ptp status: max queue depth)."""

    def __init__(self, fn: Callable[[], None], interval: float = 0.5) -> None:
        self.fn, self.interval = fn, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.fn()

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class L3ptpWatch:
    """Per-test counter deltas and max queue depth of both l3ptp ends."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.max_depth: dict[str, int] = {}
        self._before: dict[str, Any] = {}

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for host in self.lab.hosts.values():
            net = self.lab.network(host)
            out[host.name] = {"counters": dict(net["counters"]), "drops": dict(net["drops"]),
                              "seq_lost": sum(int(q.get("seq_lost", 0)) for q in net.get("queues", [])),
                              "depth": [int(q.get("queue_depth", 0)) for q in net.get("queues", [])]}
        return out

    def poll(self) -> None:
        for name, snap in self.snapshot().items():
            self.max_depth[name] = max([self.max_depth.get(name, 0), *snap["depth"]])

    def begin(self) -> None:
        self.max_depth = {}
        self._before = self.snapshot()
        for name, snap in self._before.items():
            self.max_depth[name] = max(snap["depth"], default=0)

    def end(self) -> dict[str, Any]:
        after = self.snapshot()
        out = {}
        for name, snap in after.items():
            before = self._before.get(name, {"counters": {}, "drops": {}, "seq_lost": 0})
            out[name] = {"counters": counter_delta(before["counters"], snap["counters"]),
                         "drops": counter_delta(before["drops"], snap["drops"]),
                         "seq_lost": snap["seq_lost"] - before["seq_lost"],
                         "max_queue_depth": max([self.max_depth.get(name, 0), *snap["depth"]])}
        return out


def _iface_tx(lab: Any, host: Any, iface: str) -> int:
    return int(lab.links(host).get(iface, {}).get("tx_packets", 0))


def run_tests(lab: Any, config: dict[str, Any], *, dst: str, iface: str, pids: Callable[[], dict[str, int]],
              args: argparse.Namespace, watch: L3ptpWatch | None = None) -> None:
    """The five tests of one configuration, client A -> server B at `dst`; fills `config`."""
    tests = config.setdefault("tests", {})
    ncpu = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK")
    config["ncpu"] = ncpu
    rss: dict[str, int] = config.setdefault("rss_kb", {})
    seconds = args.seconds

    def note_rss() -> None:
        for k, v in rss_of(pids()).items():
            rss[k] = max(rss.get(k, 0), v)

    def stage(name: str, fn: Callable[[], dict[str, Any]], poll: bool = True) -> None:
        _checkpoint()
        if watch is not None:
            watch.begin()
        if watch is not None and poll:
            with Poller(watch.poll):
                tests[name] = fn()
        else:
            tests[name] = fn()
        if watch is not None:
            config.setdefault("l3ptp", {})[name] = watch.end()
        note_rss()

    # ping first: it is also the reachability check.
    def ping() -> dict[str, Any]:
        res = lab.run(lab.a, ["ping", "-n", "-q", "-c", str(args.pings), "-i", "0.05", "-W", "2", dst],
                      timeout=args.pings * 0.05 + 15, check=False)
        p = parse_ping(res.stdout)
        if not p["received"]:
            raise BenchError(f"{config['name']}: no ping reply from {dst}: {(res.stdout + res.stderr).strip()[-500:]}")
        return p

    stage("ping", ping)
    _say(f"{config['name']}: ping {tests['ping']['avg_ms']:.3f} ms avg ({tests['ping']['received']}/"
         f"{tests['ping']['sent']})")

    # The same path kept warm: 200 pings 5 ms apart. Far-apart pings also
    # measure how fast each end wakes from idle (a Python process pays more).
    def ping_busy() -> dict[str, Any]:
        res = lab.run(lab.a, ["ping", "-n", "-q", "-c", "200", "-i", "0.005", "-W", "2", dst], timeout=30, check=False)
        return parse_ping(res.stdout)

    stage("ping_busy", ping_busy)
    if tests.get("ping_busy", {}).get("avg_ms") is not None:
        _say(f"{config['name']}: ping 5 ms apart {tests['ping_busy']['avg_ms']:.3f} ms avg")

    # TCP x1 with CPU accounting (no status polling in this window).
    def tcp1() -> dict[str, Any]:
        tun_pids = pids()
        tx0 = _iface_tx(lab, lab.a, iface)
        everyone0 = all_ticks()
        t0, s0 = ticks_of(tun_pids), system_ticks(_read("/proc/stat"))
        w0 = time.monotonic()
        result = lab.iperf3(lab.a, lab.b, seconds=seconds, dst=dst)
        wall = time.monotonic() - w0
        t1, s1 = ticks_of(tun_pids), system_ticks(_read("/proc/stat"))
        everyone1 = all_ticks()
        tx1 = _iface_tx(lab, lab.a, iface)
        out = tcp_summary(result)
        deltas = {k: t1[k] - t0[k] for k in t1 if k in t0}
        config["tunnel_cpu_s"] = sum(deltas.values()) / hz
        config["cpu_per_process_tcp1"] = {k: v * 100.0 / (wall * hz) for k, v in deltas.items()}
        config["proc_stat_ticks_tcp1"] = {"total": s1["total"] - s0["total"], "expected": round(wall * hz * ncpu)}
        by_cat: dict[str, int] = {}
        for k, v in deltas.items():
            by_cat[_category(k)] = by_cat.get(_category(k), 0) + v
        # iperf3 has exited (and is counted from its own report); the rest is kernel threads
        # (ksoftirqd, kworkers) and whatever else runs on the machine.
        by_cat.update(others_delta(everyone0, everyone1, [*tun_pids.values(), os.getpid()]))
        config["cpu_shares_tcp1"] = cpu_shares(by_cat, s0, s1, ncpu, wall, {"iperf3": out["iperf3_cpu_s"]}, hz)
        out["wall_s"] = wall
        out["pps"] = (tx1 - tx0) / out["seconds"] if out["seconds"] else None
        return out

    stage("tcp1", tcp1, poll=False)
    _say(f"{config['name']}: TCP x1 {tests['tcp1']['mbit']:.0f} Mbit/s, tunnel CPU "
         f"{config['tunnel_cpu_s']:.2f} s")
    stage("tcp4", lambda: tcp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, streams=4, dst=dst)))
    _say(f"{config['name']}: TCP x4 {tests['tcp4']['mbit']:.0f} Mbit/s")
    stage("udp_fixed", lambda: udp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, udp_rate=args.udp_rate, dst=dst)))
    _say(f"{config['name']}: UDP at {args.udp_rate}: {tests['udp_fixed']['mbit']:.0f} Mbit/s received, "
         f"loss {tests['udp_fixed']['loss_pct']:.2f}%")
    stage("udp_sat", lambda: udp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, udp_rate="0", dst=dst)))
    _say(f"{config['name']}: UDP saturation: {tests['udp_sat']['mbit']:.0f} Mbit/s received, "
         f"loss {tests['udp_sat']['loss_pct']:.1f}%")


def run_config(name: str, body: Callable[[Any, dict[str, Any], list[int], list[str]], None], *,
               lab_kwargs: dict[str, Any], results: list[dict[str, Any]]) -> bool:
    """One lab, one (or more) configurations measured by `body`; always closed and checked."""
    from l3ptp.controller import lab as labmod

    _checkpoint()
    started: list[int] = []
    extra_paths: list[str] = []
    lab = labmod.Lab(say=lambda line: _checkpoint(), **lab_kwargs)
    ok = True
    try:
        lab.build()
        body(lab, {"name": name}, started, extra_paths)
    except (labmod.LabError, BenchError, OSError, subprocess.TimeoutExpired) as exc:
        _say(f"{name}: FAILED: {exc}")
        results.append({"name": name, "error": str(exc)})
        ok = False
    finally:
        left = lab.close_checked(started, extra_paths)
        if left:
            _say(f"{name}: cleanup INCOMPLETE: {', '.join(left)}")
            ok = False
    return ok


def bench_baselines(args: argparse.Namespace, results: list[dict[str, Any]]) -> bool:
    ok = True
    for baseline in args.baselines:
        def body(lab: Any, config: dict[str, Any], started: list[int], extra: list[str], baseline: str = baseline) -> None:
            daemons = Daemons(lab)
            try:
                if baseline == "veth":
                    dst, iface, pids = lab.b.underlay, "under0", {}
                elif baseline == "openvpn":
                    dst, iface, pids = start_openvpn(lab, daemons, args.timeout)
                else:
                    dst, iface, pids = start_wireguard(lab, daemons, args.timeout)
                    extra += [f"/var/run/wireguard/wg{lab.tag}{h}.sock" for h in "ab"]
                started.extend(pids.values())
                _say(f"{baseline}: up ({', '.join(f'{k} pid {v}' for k, v in pids.items()) or 'no tunnel'})")
                config.update(kind="baseline", dst=dst)
                run_tests(lab, config, dst=dst, iface=iface, pids=lambda: dict(pids), args=args)
                if not pids:
                    config["tunnel_cpu_s"] = None
                config["summary"] = summarize(config)
                results.append(config)
            finally:
                daemons.stop_all()

        ok = run_config(baseline, body, lab_kwargs={"queues": 1}, results=results) and ok
    return ok


def bench_l3ptp(args: argparse.Namespace, results: list[dict[str, Any]]) -> bool:
    ok = True
    for queues in args.queues:
        for engine in args.engine:
            name = f"l3ptp q={queues} {engine}"

            def body(lab: Any, config: dict[str, Any], started: list[int], extra: list[str]) -> None:
                lab.start(wait=args.timeout)

                def pids() -> dict[str, int]:
                    out = {}
                    for host in lab.hosts.values():
                        p = lab.pids(host)
                        out[f"{host.name}.helper"] = p["helper"]
                        out[f"{host.name}.controller"] = p["controller"]
                        for i, w in enumerate(p["workers"]):
                            out[f"{host.name}.worker{i}"] = w
                    return {k: v for k, v in out.items() if v}

                started.extend(pids().values())
                _say(f"{name}: tunnel up; processes {pids()}")
                config.update(kind="l3ptp", queues=queues, engine=engine, dst=lab.b.overlay4)
                run_tests(lab, config, dst=lab.b.overlay4, iface="l3p-demo", pids=pids, args=args,
                          watch=L3ptpWatch(lab))
                config["summary"] = summarize(config)
                results.append(config)

            ok = run_config(name, body, lab_kwargs={"queues": queues, "engine": engine}, results=results) and ok
    return ok


# ---- command line --------------------------------------------------------------------------


def _list(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        if text.strip() == "none":
            return []
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))} not one of {', '.join(map(str, allowed))}")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return list(dict.fromkeys(items))

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m l3ptp.controller.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    p.add_argument("--queues", type=_list(int, range(1, 9)), default=[1, 2], metavar="N[,N...]",
                   help="l3ptp queue counts to sweep (default 1,2)")
    p.add_argument("--engine", type=_list(str, ENGINES), default=["aioquic", "qh3"], metavar="E[,E...]",
                   help="QUIC engines to sweep: aioquic, qh3, auto (default aioquic,qh3; those not installed are skipped)")
    p.add_argument("--baselines", type=_list(str, BASELINES), default=list(BASELINES), metavar="B[,B...]",
                   help="baselines: veth, openvpn, wireguard-go (default all; 'none' for none)")
    p.add_argument("--udp-rate", default="300M", help="offered rate of the fixed-rate UDP test (default 300M)")
    p.add_argument("--pings", type=int, default=20, help="pings, 0.05 s apart (default 20)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a tunnel to come up (default 30)")
    p.add_argument("--json", metavar="PATH", help="write every result to PATH as JSON")
    p.add_argument("--skip-install", action="store_true", help="do not apt-get install missing packages; fail instead")
    return p


def _engine_available(engine: str) -> bool:
    if engine == "auto":
        return True
    import importlib.util

    return importlib.util.find_spec(engine) is not None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.seconds <= 120:
        print("bench: --seconds must be within 1..120", file=sys.stderr)
        return 2
    if not re.fullmatch(r"\d+(\.\d+)?[KMG]?", args.udp_rate):
        print("bench: --udp-rate must look like 300M", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, TUN devices, other uids)", file=sys.stderr)
        return 2
    skipped = [e for e in args.engine if not _engine_available(e)]
    if skipped:
        _say(f"skipping engine(s) not installed: {', '.join(skipped)}")
    args.engine = [e for e in args.engine if e not in skipped]
    global _interrupts
    from l3ptp.controller import lab as labmod

    _interrupts = labmod.Interrupts().install()
    results: list[dict[str, Any]] = []
    code = 0
    started = time.time()
    try:
        ensure_packages(args.baselines, args.skip_install)
        ok = bench_baselines(args, results)
        ok = bench_l3ptp(args, results) and ok
        code = 0 if ok else 1
    except BenchError as exc:
        _say(f"FAILED: {exc}")
        code = 1
    except subprocess.TimeoutExpired as exc:
        _say(f"FAILED: timed out: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    if code == 130 or _interrupts.hit:  # also when it only showed as a failed tool (exception lost in a fork hook)
        _say("interrupted; everything started was stopped and removed")
        code = 130
    report = {
        "date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "machine": {"ncpu": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "cpu": _cpu_model()},
        "settings": {"seconds": args.seconds, "udp_rate": args.udp_rate, "udp_len": UDP_LEN,
                     "tunnel_mtu": TUNNEL_MTU, "pings": args.pings},
        "configs": results,
    }
    if results:
        print("\n" + render_table(results), flush=True)
        print("\n" + render_table(results, columns=DETAIL_COLUMNS), flush=True)
        l3 = [c for c in results if c.get("kind") == "l3ptp"]
        if l3:
            print("\nbottlenecks (l3ptp):")
            for c in l3:
                print(render_bottleneck(c))
        for c in results:
            if c.get("kind") == "baseline" and c.get("cpu_shares_tcp1"):
                print(f"{c['name']}: CPU during TCP x1, % of one core: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in sorted(c["cpu_shares_tcp1"].items(), key=lambda kv: -kv[1])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        _say(f"results written to {args.json}")
    return code


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
