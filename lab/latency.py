"""`python -m lab.latency`: where a ping's round trip goes inside two workers (docs/performance.md, Latency).

Two real `Tunnel`s (connector A, listener B) run in this process on one asyncio loop over loopback
with fake TUNs (tests/support/worker_fixtures.py). One ICMP echo at a time is injected into A's TUN;
when it comes out of B's TUN the harness writes the reply into B's TUN at once (the kernel's part);
the sample ends when the reply comes out of A's TUN. Samples are `--gap` apart (like `ping -i`).

Every sample is timed with `time.perf_counter_ns` marks put in by wrapping (here, not in the
product) the four hops' loop callbacks -- A `_on_tun_readable`, B `_on_udp_readable`, B
`_on_tun_readable`, A `_on_udp_readable` -- and, inside them, the engine receive, the QUIC event
handling (datapath and TUN write included), `datagrams_to_send`, the UDP send and `_schedule`
(timer re-arm). "wake" is the time from the syscall that made the fd readable (the previous hop's
send or write, or the harness's inject) to the callback's start: the rest of the loop iteration,
epoll, the dispatch. Timer callbacks that run while a packet is in flight are counted: a packet
that waits for a timer shows there. CPU time (`time.process_time`) is per round trip, from inject
to reply, and per gap over the whole run (delayed ACKs and other timer work included).

One process and one loop: the wake-ups are those of one thread, not four processes' (the real
deployment); the in-callback costs are the real ones. Not a test: nothing here asserts a speed.

`--compare BASE`: run this harness alternately with this checkout's interpreter and with
BASE/.venv/bin/python (a second checkout, its l3ptp installed there), `--rounds` times each,
interleaved, and print both sets of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ns = time.perf_counter_ns

#: The four hops' callbacks, in the order a round trip runs them.
HOPS = (("A", "tun"), ("B", "udp"), ("B", "tun"), ("A", "udp"))
PARTS = ("receive", "events", "write_tun", "from_tun", "to_send", "udp_send", "schedule")


class Probe:
    """The marks and part durations of the sample in flight."""

    def __init__(self) -> None:
        self.ctx = ""
        self.marks: dict[str, int] = {}
        self.parts: dict[str, int] = defaultdict(int)
        self.counts: dict[str, int] = defaultdict(int)
        self.active = False
        #: Over the whole run, samples and gaps: callbacks and datagrams sent, by context.
        self.totals: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.marks = {}
        self.parts = defaultdict(int)
        self.counts = defaultdict(int)
        self.active = True

    def mark(self, name: str, t: int | None = None, *, first: bool = True) -> None:
        if self.active and (not first or name not in self.marks):
            self.marks[name] = ns() if t is None else t


P = Probe()


def _callback(ctx: str, fn: Callable[[], None]) -> Callable[[], None]:
    def wrapped() -> None:
        t = ns()
        outer, P.ctx = P.ctx, ctx
        try:
            fn()
        finally:
            P.ctx = outer
            P.totals[ctx] += 1
            if P.active:
                P.counts[ctx] += 1
                P.mark(ctx + ".in", t)
                P.mark(ctx + ".out", first=False)
    wrapped.__name__ = fn.__name__
    return wrapped


def _part(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kw: Any) -> Any:
        t = ns()
        try:
            return fn(*args, **kw)
        finally:
            if P.active:
                P.parts[f"{P.ctx}.{name}"] += ns() - t
    return wrapped


def instrument(tunnel: Any, side: str) -> None:
    """Wrap `tunnel`'s callbacks and parts (before its `run` starts: it registers the bound callbacks)."""
    tunnel._on_tun_readable = _callback(side + ".tun", tunnel._on_tun_readable)
    tunnel._on_udp_readable = _callback(side + ".udp", tunnel._on_udp_readable)
    tunnel._on_timer = _callback(side + ".timer", tunnel._on_timer)
    tunnel._process_events = _part("events", tunnel._process_events)
    tunnel._schedule = _part("schedule", tunnel._schedule)
    tunnel._write_tun = _part("write_tun", tunnel._write_tun)
    tunnel.engine = dataclasses.replace(tunnel.engine, receive_many=_part("receive", tunnel.engine.receive_many))
    cls = tunnel.engine.QuicConnection  # one class per engine, shared by both tunnels: wrap it once
    if not getattr(cls.datagrams_to_send, "timed", False):
        cls.datagrams_to_send = _part("to_send", cls.datagrams_to_send)
        cls.datagrams_to_send.timed = True


def instrument_classes() -> None:
    from l3ptp.worker.datapath import Datapath
    from l3ptp.worker.udp import UdpIO

    send = UdpIO.send

    def counted_send(self: Any, datagrams: list[Any]) -> None:
        P.totals[P.ctx + ".datagrams"] += len(datagrams)
        if P.active:
            P.counts[P.ctx + ".datagrams"] += len(datagrams)
        send(self, datagrams)
    UdpIO.send = _part("udp_send", counted_send)  # type: ignore[method-assign]
    Datapath.from_tun_batch = _part("from_tun", Datapath.from_tun_batch)  # type: ignore[method-assign]


async def measure(engine_name: str, samples: int, warmup: int, gap: float, size: int, spin: bool = False,
                  offload: bool = True) -> dict[str, Any]:
    from l3ptp.ipc.control_messages import Engine
    from tests.support.packets import ipv4_icmp_echo
    from tests.support.worker_fixtures import addresses, worker_pair
    from l3ptp.ipc.types import PeerRole

    instrument_classes()
    loop = asyncio.get_running_loop()
    a_ip, b_ip = addresses(PeerRole.CONNECT)[0], addresses(PeerRole.LISTEN)[0]
    payload = bytes(max(0, size - 28))
    out: list[dict[str, Any]] = []
    async with worker_pair(engine=Engine(engine_name), listener_kw={"keepalive": 25.0},
                           connector_kw={"keepalive": 25.0}, tunnel_kw={"gso": offload, "gro": offload}) as pair:
        a, b = pair.connector, pair.listener
        instrument(a.tunnel, "A")
        instrument(b.tunnel, "B")
        if not await pair.wait_established(15):
            raise SystemExit("no session")
        done: asyncio.Future[None] | None = None

        reply = b""

        def b_host() -> None:
            if b.tun.read_all():
                P.mark("B.host")
                P.mark("B.reply")
                b.tun.inject(reply)

        def a_host() -> None:
            if a.tun.read_all():
                P.mark("A.host")
                if done is not None and not done.done():
                    done.set_result(None)

        loop.add_reader(b.tun.host.fileno(), b_host)
        loop.add_reader(a.tun.host.fileno(), a_host)
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for seq in range(1, warmup + samples + 1):
            if seq == warmup + 1:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                P.totals.clear()
            if spin:  # keep this thread on its core through the gap (the loop still runs now and then)
                end = time.perf_counter() + gap
                while time.perf_counter() < end:
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(gap)
            ping = ipv4_icmp_echo(a_ip, b_ip, seq=seq, payload=payload)
            reply = ipv4_icmp_echo(b_ip, a_ip, seq=seq, payload=payload)
            done = loop.create_future()
            lost = loop.call_later(2.0, done.cancel)
            P.reset()
            c = time.process_time()
            P.mark("inject")
            a.tun.inject(ping)
            try:
                await done
            except asyncio.CancelledError:
                P.active = False
                continue
            cpu = time.process_time() - c
            lost.cancel()
            P.active = False
            if seq > warmup:
                out.append({"marks": dict(P.marks), "parts": dict(P.parts), "counts": dict(P.counts), "cpu": cpu})
        cpu_all, wall_all = time.process_time() - cpu0, time.perf_counter() - wall0
        loop.remove_reader(b.tun.host.fileno())
        loop.remove_reader(a.tun.host.fileno())
    return {"engine": engine_name, "gap": gap, "size": size, "samples": out,
            "per_gap": {k: v / max(1, samples) for k, v in sorted(P.totals.items())},
            "cpu_per_gap_us": cpu_all / max(1, samples) * 1e6, "wall_per_gap_s": wall_all / max(1, samples)}


def per_sample(s: dict[str, Any]) -> dict[str, float]:
    """One sample's figures in µs."""
    m, parts, counts = s["marks"], s["parts"], s["counts"]
    us = lambda v: v / 1000.0  # noqa: E731
    row: dict[str, float] = {"rtt": us(m["A.host"] - m["inject"]), "cpu_rt": s["cpu"] * 1e6}
    prev = m["inject"]
    for side, kind in HOPS:
        ctx = f"{side}.{kind}"
        if ctx + ".in" not in m:
            continue
        row[f"{ctx} wake"] = us(m[ctx + ".in"] - prev)
        row[f"{ctx} run"] = us(m[ctx + ".out"] - m[ctx + ".in"])
        for part in PARTS:
            if f"{ctx}.{part}" in parts:
                row[f"{ctx} {part}"] = us(parts[f"{ctx}.{part}"])
        row[f"{ctx} datagrams"] = counts.get(ctx + ".datagrams", 0)
        prev = m[ctx + ".out"]
        if ctx == "B.udp":
            row["B harness"] = us(m["B.reply"] - prev)
            prev = m["B.reply"]
    row["A harness"] = us(m["A.host"] - prev)
    row["timers"] = sum(v for k, v in counts.items() if k.endswith(".timer"))
    row["extra callbacks"] = sum(v - 1 for k, v in counts.items() if k.endswith((".udp", ".tun")))
    return row


def summarize(results: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Per figure: median, 25th and 75th percentile over every sample of `results`."""
    rows = [per_sample(s) for r in results for s in r["samples"]]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    out = {}
    for k in keys:
        vals = sorted(row[k] for row in rows if k in row)
        q = statistics.quantiles(vals, n=4) if len(vals) > 1 else [vals[0]] * 3
        out[k] = (statistics.median(vals), q[0], q[2])
    for k in sorted({k for r in results for k in r.get("per_gap", {})}):
        vals = [r.get("per_gap", {}).get(k, 0.0) for r in results]
        out[f"per gap: {k}"] = (statistics.median(vals), min(vals), max(vals))
    out["cpu per gap (all work)"] = (statistics.median(r["cpu_per_gap_us"] for r in results),
                                     min(r["cpu_per_gap_us"] for r in results),
                                     max(r["cpu_per_gap_us"] for r in results))
    return out


def render(named: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    names = list(named)
    keys: list[str] = []
    for s in named.values():
        keys += [k for k in s if k not in keys]
    lines = ["figure (µs; median [p25-p75])".ljust(28) + "".join(n.rjust(26) for n in names)]
    for k in keys:
        cells = []
        for n in names:
            v = named[n].get(k)
            cells.append((f"{v[0]:.1f} [{v[1]:.1f}-{v[2]:.1f}]" if v else "-").rjust(26))
        lines.append(k.ljust(28) + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="qh3", choices=("qh3", "aioquic"))
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between pings (ping -i)")
    ap.add_argument("--size", type=int, default=84, help="IP packet size (ping's default: 84)")
    ap.add_argument("--json", action="store_true", help="print the raw samples as JSON")
    ap.add_argument("--compare", metavar="BASE", help="another checkout with its .venv: interleaved A/B")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: runs of each, alternating")
    ap.add_argument("--no-offload", action="store_true", help="workers without UDP GSO and GRO")
    ap.add_argument("--spin", action="store_true", help="busy-wait through the gap instead of sleeping")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)
    run = measure(args.engine, args.samples, args.warmup, args.gap, args.size, args.spin, not args.no_offload)
    if args.uvloop:
        import uvloop
        result = uvloop.run(run)
    else:
        result = asyncio.run(run)
    if args.json:
        print("\n" + json.dumps(result))  # the last line (the workers log to stdout)
        return 0
    print(render({f"{args.engine} ({len(result['samples'])})": summarize([result])}))
    return 0


def compare(args: argparse.Namespace) -> int:
    here = Path(__file__).resolve().parent.parent
    interpreters = {"base": str(Path(args.compare) / ".venv/bin/python"), "this": sys.executable}
    common = ["-m", "lab.latency", "--json", "--engine", args.engine, "--samples", str(args.samples),
              "--warmup", str(args.warmup), "--gap", str(args.gap), "--size", str(args.size)]
    common += ["--uvloop"] * args.uvloop + ["--spin"] * args.spin + ["--no-offload"] * args.no_offload
    results: dict[str, list[dict[str, Any]]] = {"base": [], "this": []}
    for r in range(args.rounds):
        order = ("base", "this") if r % 2 == 0 else ("this", "base")
        for name in order:
            proc = subprocess.run([interpreters[name], *common], cwd=here, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(here)}, check=True)
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: rtt median "
                  f"{statistics.median(per_sample(s)['rtt'] for s in results[name][-1]['samples']):.1f} µs",
                  file=sys.stderr)
    print(render({f"{n} ({sum(len(x['samples']) for x in rs)})": summarize(rs) for n, rs in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
