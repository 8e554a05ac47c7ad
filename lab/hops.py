"""`python -m lab.hops`: where a ping's round trip goes in the real deployment, hop by hop (docs/performance.md,
Latency), for l3ptp and for OpenVPN in the same run.

`lab.latency` times the Python inside two workers sharing one process; this measures the running tunnel from
outside. Each lab host gets a packet capture (an AF_PACKET socket in its namespace, `SO_TIMESTAMPNS`: the
kernel's timestamp as a packet passes an interface, out or in). `ping` sends echoes `--gap` apart from A to B
across the tunnel. Both namespaces share the machine's clock, so for every echo that made the whole trip:

1. A tun -> udp: the echo leaves A's kernel into the tunnel interface, until its tunnel datagram leaves A's
   underlay interface (A's daemon woken, reading, encrypting, sending);
2. B udp -> tun: the datagram reaches B's underlay, until the echo enters B's kernel from the tunnel interface;
3. B tun -> udp: B's kernel's reply leaves into the tunnel interface, until its datagram leaves B's underlay;
4. A udp -> tun: the reply's datagram reaches A's underlay, until the reply enters A's kernel;

plus the wire (veth) both ways and B's kernel answering (echo in, reply out). Tunnel datagrams are told from
the engine's ACK-only packets and keepalives by size (at least the ICMP packet plus IP, UDP and `MIN_OVERHEAD`).
The figures are medians with the 25th-75th percentiles over every echo of every round; rounds interleave the
configurations. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

__all__ = ["HOPS", "Row", "hops_of", "main", "parse_rows"]

SO_TIMESTAMPNS = 35
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PROTO_ICMP, PROTO_UDP = 1, 17
ICMP_ECHO, ICMP_REPLY = 8, 0
IP_UDP = 28  # IPv4 and UDP headers around a tunnel datagram
MIN_OVERHEAD = 16  # the least a tunnel adds inside its UDP payload (l3ptp: 16-byte header + QUIC)

HOPS = ("1 A tun->udp", "wire A->B", "2 B udp->tun", "B kernel echo", "3 B tun->udp", "wire B->A", "4 A udp->tun",
        "round trip")


class Row(NamedTuple):
    ts: int  # ns, the kernel's timestamp
    ifname: str
    out: bool  # leaving through the interface (else arriving)
    length: int
    head: bytes  # the first bytes from the IP header on


def parse_rows(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        ts, ifname, out, length, head = line.split()
        rows.append(Row(int(ts), ifname, out == "1", int(length), bytes.fromhex(head)))
    return rows


def _icmp(rows: Sequence[Row], ifname: str, out: bool, kind: int) -> dict[int, Row]:
    """ICMP echoes (or replies) of IPv4 on `ifname` in one direction, by ICMP sequence number (first seen)."""
    found: dict[int, Row] = {}
    for r in rows:
        h = r.head
        if (r.ifname == ifname and r.out == out and len(h) >= 28 and h[0] == 0x45 and h[9] == PROTO_ICMP
                and h[20] == kind):
            found.setdefault(int.from_bytes(h[26:28], "big"), r)
    return found


def _datagram_after(rows: Sequence[Row], ifname: str, out: bool, ts: int, min_len: int) -> Row | None:
    for r in rows:
        if (r.ts >= ts and r.ifname == ifname and r.out == out and r.length >= min_len and len(r.head) >= 10
                and r.head[9] == PROTO_UDP):
            return r
    return None


def hops_of(a: Sequence[Row], b: Sequence[Row], tun: str, underlay: str) -> list[dict[str, float]]:
    """Per echo that made the whole trip: each of `HOPS` in microseconds. `a`, `b`: each host's rows in capture
    order; `tun`, `underlay`: the interface names (the same on both hosts)."""
    echo_a, echo_b = _icmp(a, tun, True, ICMP_ECHO), _icmp(b, tun, False, ICMP_ECHO)
    reply_b, reply_a = _icmp(b, tun, True, ICMP_REPLY), _icmp(a, tun, False, ICMP_REPLY)
    samples = []
    for seq, start in sorted(echo_a.items()):
        if seq not in echo_b or seq not in reply_b or seq not in reply_a:
            continue
        min_len = start.length + IP_UDP + MIN_OVERHEAD
        a_out = _datagram_after(a, underlay, True, start.ts, min_len)
        b_in = a_out and _datagram_after(b, underlay, False, a_out.ts, min_len)
        b_out = _datagram_after(b, underlay, True, reply_b[seq].ts, min_len)
        a_in = b_out and _datagram_after(a, underlay, False, b_out.ts, min_len)
        if not (a_out and b_in and b_out and a_in) or not (b_in.ts <= echo_b[seq].ts and a_in.ts <= reply_a[seq].ts):
            continue
        marks = (start.ts, a_out.ts, b_in.ts, echo_b[seq].ts, reply_b[seq].ts, b_out.ts, a_in.ts, reply_a[seq].ts)
        sample = {name: (marks[i + 1] - marks[i]) / 1000 for i, name in enumerate(HOPS[:-1])}
        sample[HOPS[-1]] = (marks[-1] - marks[0]) / 1000
        samples.append(sample)
    return samples


# ---- capture (a child process in a host's namespace) ----------------------------------------------------------

def capture(out: str, seconds: float) -> None:
    """Write one line per packet seen in this namespace: ts_ns ifname out length head_hex. Prints "ready"."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.settimeout(0.2)
    end = time.monotonic() + seconds
    with open(out, "w") as f:
        print("ready", flush=True)
        while time.monotonic() < end:
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, 256)
            except TimeoutError:
                continue
            ts = next((sec * 10**9 + ns for level, kind, d in anc if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS
                       for sec, ns in [struct.unpack("qq", d[:16])]), None)
            if ts is not None:
                f.write(f"{ts} {addr[0]} {int(addr[2] == PACKET_OUTGOING)} {len(data)} {data[:64].hex()}\n")
    sock.close()


@contextlib.contextmanager
def captured(lab: Any, seconds: float, workdir: str) -> Iterator[dict[str, str]]:
    """One capture per host while the body runs; yields {host name: file}, complete after the block."""
    from lab.netns import setns

    files, procs = {}, []
    try:
        for host in (lab.a, lab.b):
            files[host.name] = os.path.join(workdir, f"capture-{host.name}.txt")
            proc = subprocess.Popen([sys.executable, "-m", "lab.hops", "--capture", files[host.name], str(seconds)],
                                    stdout=subprocess.PIPE, text=True, preexec_fn=lambda ns=host.netns: setns(ns))
            procs.append(proc)
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"capture on host {host.name} did not start")
        yield files
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=seconds + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# ---- runs ------------------------------------------------------------------------------------------------------

def _ping(lab: Any, dst: str, count: int, gap: float) -> float:
    from lab.bench.report import parse_ping

    out = lab.run(lab.a, ["ping", "-n", "-q", "-c", str(count), "-i", str(gap), "-W", "2", dst],
                  timeout=count * gap + 30).stdout
    avg = parse_ping(out)["avg_ms"]
    if avg is None:
        raise RuntimeError(f"ping across the tunnel failed: {out.strip()}")
    return float(avg)


def run_one(config: str, engine: str, count: int, gap: float) -> tuple[float, list[dict[str, float]]]:
    """One lab, one configuration ("l3ptp" or "openvpn"): ping's own average (ms) and the per-echo hops."""
    from lab import hosts as labmod
    from lab.bench.baselines import Daemons, start_openvpn

    lab = labmod.Lab(queues=1, engine=engine)
    daemons = None
    try:
        lab.build()
        if config == "openvpn":
            daemons = Daemons(lab)
            dst, tun, _pids = start_openvpn(lab, daemons, 60)
        else:
            lab.start(wait=30)
            dst, tun = lab.b.overlay4, "l3p-" + labmod.NETWORK
        _ping(lab, dst, 5, 0.2)  # the tunnel is up and warm
        with tempfile.TemporaryDirectory(prefix="l3ptp-hops-") as workdir:
            with captured(lab, count * gap + 4, workdir) as files:
                avg = _ping(lab, dst, count, gap)
            with open(files["a"]) as fa, open(files["b"]) as fb:
                samples = hops_of(parse_rows(fa.read()), parse_rows(fb.read()), tun, "under0")
        return avg, samples
    finally:
        if daemons is not None:
            daemons.stop_all()
        lab.close()


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.0f} [{q[0]:.0f}-{q[2]:.0f}]"


def render(results: dict[str, list[tuple[float, list[dict[str, float]]]]]) -> str:
    names = list(results)
    lines = ["| us, median [25th-75th percentile] | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for hop in HOPS:
        lines.append(f"| {hop} | " + " | ".join(_cell([s[hop] for _, samples in results[n] for s in samples])
                                                 for n in names) + " |")
    lines.append("| echoes paired / ping's average per round (ms) | " + " | ".join(
        f"{sum(len(s) for _, s in results[n])}; " + ", ".join(f"{avg:.3f}" for avg, _ in results[n]) for n in names)
        + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.hops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="qh3", choices=("qh3", "aioquic"))
    ap.add_argument("--count", type=int, default=200, help="pings per round")
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between pings (ping -i)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baselines", default="openvpn", help="'openvpn' or 'none'")
    ap.add_argument("--capture", nargs=2, metavar=("FILE", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.capture:
        capture(args.capture[0], float(args.capture[1]))
        return 0
    if os.geteuid() != 0:
        print("python -m lab.hops: needs root (network namespaces, packet capture)", file=sys.stderr)
        return 2
    configs = ["l3ptp"] + (["openvpn"] if args.baselines == "openvpn" else [])
    results: dict[str, list[tuple[float, list[dict[str, float]]]]] = {}
    for round_no in range(1, args.rounds + 1):
        for config in configs:
            name = f"l3ptp {args.engine}" if config == "l3ptp" else config
            avg, samples = run_one(config, args.engine, args.count, args.gap)
            print(f"[hops] round {round_no} {name}: ping {avg:.3f} ms, {len(samples)} echoes paired", flush=True)
            results.setdefault(name, []).append((avg, samples))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
