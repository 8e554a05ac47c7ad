"""`make bench` / `python -m lab.bench`: the command, the tests of one configuration, the l3ptp runs.

The package docstring (lab/bench/__init__.py) says what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from l3ptp.controller.config.schema import OFFLOAD_DEFAULT
from l3ptp.ipc.control_messages import Engine
from lab import bench as _package
from lab import hosts as labmod
from lab.bench import common
from lab.bench.baselines import (BASELINES, EQUAL_MTU_SUFFIX, Daemons, baseline_kind, ensure_packages, link_mtu,
                                 start_openvpn, start_wireguard)
from lab.bench.common import TUNNEL_MTU, UDP_LEN, BenchError, checkpoint, say
from lab.bench.cpu import _category, all_ticks, cpu_shares, others_delta, read_proc, rss_of, system_ticks, ticks_of
from lab.bench.report import (DETAIL_COLUMNS, REFERENCE, aggregate, counter_delta, parse_ping, render_bottleneck,
                              render_rounds_table, summarize, tcp_summary, udp_summary)

__all__ = ["ENGINES", "build_parser", "main", "plan_baselines", "plan_l3ptp", "run_config", "run_rounds", "run_tests"]

#: Engines `--engine` accepts: the ipc enum's, the concrete ones first, "auto" last.
ENGINES = (*(e.value for e in Engine if e is not Engine.AUTO), Engine.AUTO.value)


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
        checkpoint()
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
    say(f"{config['name']}: ping {tests['ping']['avg_ms']:.3f} ms avg ({tests['ping']['received']}/"
         f"{tests['ping']['sent']})")

    # The same path kept warm: 200 pings 5 ms apart. Far-apart pings also
    # measure how fast each end wakes from idle (a Python process pays more).
    def ping_busy() -> dict[str, Any]:
        res = lab.run(lab.a, ["ping", "-n", "-q", "-c", "200", "-i", "0.005", "-W", "2", dst], timeout=30, check=False)
        return parse_ping(res.stdout)

    stage("ping_busy", ping_busy)
    if tests.get("ping_busy", {}).get("avg_ms") is not None:
        say(f"{config['name']}: ping 5 ms apart {tests['ping_busy']['avg_ms']:.3f} ms avg")

    # TCP x1 with CPU accounting (no status polling in this window).
    def tcp1() -> dict[str, Any]:
        tun_pids = pids()
        tx0 = _iface_tx(lab, lab.a, iface)
        everyone0 = all_ticks()
        t0, s0 = ticks_of(tun_pids), system_ticks(read_proc("/proc/stat"))
        w0 = time.monotonic()
        result = lab.iperf3(lab.a, lab.b, seconds=seconds, dst=dst)
        wall = time.monotonic() - w0
        t1, s1 = ticks_of(tun_pids), system_ticks(read_proc("/proc/stat"))
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
    say(f"{config['name']}: TCP x1 {tests['tcp1']['mbit']:.0f} Mbit/s, tunnel CPU "
         f"{config['tunnel_cpu_s']:.2f} s")
    stage("tcp4", lambda: tcp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, streams=4, dst=dst)))
    say(f"{config['name']}: TCP x4 {tests['tcp4']['mbit']:.0f} Mbit/s")
    stage("udp_fixed", lambda: udp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, udp_rate=args.udp_rate, dst=dst)))
    say(f"{config['name']}: UDP at {args.udp_rate}: {tests['udp_fixed']['mbit']:.0f} Mbit/s received, "
         f"loss {tests['udp_fixed']['loss_pct']:.2f}%")
    stage("udp_sat", lambda: udp_summary(lab.iperf3(lab.a, lab.b, seconds=seconds, udp_rate="0", dst=dst)))
    say(f"{config['name']}: UDP saturation: {tests['udp_sat']['mbit']:.0f} Mbit/s received, "
         f"loss {tests['udp_sat']['loss_pct']:.1f}%")


def run_config(name: str, body: Callable[[Any, dict[str, Any], list[int], list[str]], None], *,
               lab_kwargs: dict[str, Any], results: list[dict[str, Any]], round_no: int = 1) -> bool:
    """One lab, one (or more) configurations measured by `body`; always closed and checked."""
    checkpoint()
    started: list[int] = []
    extra_paths: list[str] = []
    lab = labmod.Lab(say=lambda line: checkpoint(), **lab_kwargs)
    ok = True
    try:
        lab.build()
        body(lab, {"name": name, "round": round_no}, started, extra_paths)
    except (labmod.LabError, BenchError, OSError, subprocess.TimeoutExpired) as exc:
        say(f"{name}: FAILED: {exc}")
        results.append({"name": name, "round": round_no, "error": str(exc)})
        ok = False
    finally:
        left = lab.close_checked(started, extra_paths)
        if left:
            say(f"{name}: cleanup INCOMPLETE: {', '.join(left)}")
            ok = False
    return ok


#: One configuration of a round: its name, the body that measures it in a fresh lab, the lab's arguments.
Plan = tuple[str, Callable[[Any, dict[str, Any], list[int], list[str]], None], dict[str, Any]]


def plan_baselines(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[Plan]:
    plans: list[Plan] = []
    for baseline in args.baselines:
        kind, mtu = baseline_kind(baseline)

        def body(lab: Any, config: dict[str, Any], started: list[int], extra: list[str],
                 kind: str = kind, mtu: int | None = mtu) -> None:
            daemons = Daemons(lab)
            try:
                if kind == "veth":
                    dst, iface, pids = lab.b.underlay, "under0", {}
                elif kind == "openvpn":
                    dst, iface, pids = start_openvpn(lab, daemons, args.timeout, mtu)
                else:
                    dst, iface, pids = start_wireguard(lab, daemons, args.timeout, mtu)
                    extra += [f"/var/run/wireguard/wg{lab.tag}{h}.sock" for h in "ab"]
                started.extend(pids.values())
                config.update(kind="baseline", dst=dst, mtu=link_mtu(lab.a, iface))
                procs = ", ".join(f"{k} pid {v}" for k, v in pids.items()) or "no tunnel"
                say(f"{config['name']}: up, MTU {config['mtu']} ({procs})")
                run_tests(lab, config, dst=dst, iface=iface, pids=lambda: dict(pids), args=args)
                if not pids:
                    config["tunnel_cpu_s"] = None
                config["summary"] = summarize(config)
                results.append(config)
            finally:
                daemons.stop_all()

        plans.append((baseline, body, {"queues": 1}))
    return plans


#: `--mtu` values: the default MTU (1280, no `mtu` key) and `mtu = "auto"` (derived from the underlay path).
L3PTP_MTUS = ("1280", "auto")


#: `--offload` values: the network's `offload`, "gro" (the default: coalesced writes only), "off" (a plain TUN) or
#: "auto" (TSO and GRO where the kernel allows).
L3PTP_OFFLOADS = ("off", "gro", "auto")

#: `--event-loop` values: the network's `event_loop`, "auto" (the default: asyncio) or "uvloop".
L3PTP_LOOPS = ("auto", "uvloop")

#: `--to` values: where l3ptp's tests send: "overlay" (the default: B's tunnel address, delivered by B's TUN
#: as local traffic) or "routed" (B's address behind the tunnel, on its loopback, reached through the
#: installed route: B's worker writes packets that are not for the TUN's own addresses, site-to-site traffic).
L3PTP_DESTS = ("overlay", "routed")


def l3ptp_name(queues: int, engine: str, mtu: str, offload: str = OFFLOAD_DEFAULT, loop: str = "auto",
               dest: str = "overlay") -> str:
    """`l3ptp q=1 qh3` at the defaults, `l3ptp@auto q=1 qh3` with ``mtu = "auto"``; ` offload=off` (or `=auto`)
    with other TUN offloads than the default, ` uvloop` on uvloop, ` routed` to the address behind B."""
    return (f"l3ptp{'' if mtu == '1280' else '@' + mtu} q={queues} {engine}"
            f"{'' if offload == OFFLOAD_DEFAULT else ' offload=' + offload}"
            f"{' uvloop' * (loop == 'uvloop')}{' routed' * (dest == 'routed')}")


def plan_l3ptp(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[Plan]:
    plans: list[Plan] = []
    for queues, engine, mtu, offload, loop, dest in itertools.product(args.queues, args.engine, args.mtu,
                                                                      args.offload, args.event_loop, args.to):
        name = l3ptp_name(queues, engine, mtu, offload, loop, dest)

        def body(lab: Any, config: dict[str, Any], started: list[int], extra: list[str],
                 queues: int = queues, engine: str = engine, mtu: str = mtu, offload: str = offload,
                 loop: str = loop, dest: str = dest) -> None:
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
            dst = labmod.REMOTE4 if dest == "routed" else lab.b.overlay4
            config.update(kind="l3ptp", queues=queues, engine=engine, dst=dst,
                          mtu=link_mtu(lab.a, "l3p-demo"), mtu_setting=mtu, offload=offload, event_loop=loop)
            say(f"{config['name']}: tunnel up, MTU {config['mtu']}, tests to {dst}; processes {pids()}")
            run_tests(lab, config, dst=dst, iface="l3p-demo", pids=pids, args=args,
                      watch=L3ptpWatch(lab))
            config["summary"] = summarize(config)
            results.append(config)

        extra = {**({"mtu": "auto"} if mtu == "auto" else {}), **({"offload": offload} if offload != OFFLOAD_DEFAULT else {}),
                 **({"event_loop": "uvloop"} if loop == "uvloop" else {})}
        plans.append((name, body, {"queues": queues, "engine": engine, "config_a": extra or None,
                                   "config_b": extra or None}))
    return plans


def run_rounds(plans: Sequence[Plan], rounds: int, results: list[dict[str, Any]]) -> bool:
    """Every configuration once per round, rounds one after the other (interleaved: a slow spell of the
    machine touches each configuration alike instead of the ones measured in it)."""
    ok = True
    for r in range(1, rounds + 1):
        say(f"round {r} of {rounds}")
        for name, body, lab_kwargs in plans:
            ok = run_config(name, body, lab_kwargs=lab_kwargs, results=results, round_no=r) and ok
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
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=(_package.__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run (default 5)")
    p.add_argument("--queues", type=_list(int, range(1, 9)), default=[1, 2], metavar="N[,N...]",
                   help="l3ptp queue counts to sweep (default 1,2)")
    p.add_argument("--mtu", type=_list(str, L3PTP_MTUS), default=list(L3PTP_MTUS), metavar="M[,M...]",
                   help="l3ptp MTU settings: 1280 (the default) and/or auto (mtu = \"auto\": derived from the "
                        "underlay path, 1412 on the lab's 1500-byte veth); default 1280,auto")
    p.add_argument("--offload", type=_list(str, L3PTP_OFFLOADS), default=[OFFLOAD_DEFAULT], metavar="O[,O...]",
                   help=f"l3ptp TUN offloads: gro (the default), off and/or auto (offload = \"off\", \"auto\"); "
                        f"'gro,off' measures both in the same rounds (default {OFFLOAD_DEFAULT})")
    p.add_argument("--event-loop", type=_list(str, L3PTP_LOOPS), default=["auto"], metavar="L[,L...]",
                   help="l3ptp workers' event loop: auto (the default, asyncio) and/or uvloop (event_loop = "
                        "\"uvloop\", needs l3ptp[fast]); 'auto,uvloop' measures both in the same rounds (default auto)")
    p.add_argument("--to", type=_list(str, L3PTP_DESTS), default=["overlay"], metavar="D[,D...]",
                   help="where l3ptp's tests send: overlay (B's tunnel address, the default) and/or routed (B's "
                        "address behind the tunnel, through the installed route: site-to-site traffic)")
    p.add_argument("--engine", type=_list(str, ENGINES), default=["aioquic", "qh3"], metavar="E[,E...]",
                   help="QUIC engines to sweep: aioquic, qh3, auto (default aioquic,qh3; those not installed are skipped)")
    p.add_argument("--baselines", type=_list(str, BASELINES), default=list(BASELINES), metavar="B[,B...]",
                   help=f"baselines: {', '.join(BASELINES)}; a name alone runs the tunnel at its own defaults, "
                        f"{EQUAL_MTU_SUFFIX} at l3ptp's inner MTU (default all; 'none' for none)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds, every configuration once per round; figures are the median with "
                        "the spread (default 3)")
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
    if not 1 <= args.rounds <= 20:
        print("bench: --rounds must be within 1..20", file=sys.stderr)
        return 2
    if not re.fullmatch(r"\d+(\.\d+)?[KMG]?", args.udp_rate):
        print("bench: --udp-rate must look like 300M", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, TUN devices, other uids)", file=sys.stderr)
        return 2
    skipped = [e for e in args.engine if not _engine_available(e)]
    if skipped:
        say(f"skipping engine(s) not installed: {', '.join(skipped)}")
    args.engine = [e for e in args.engine if e not in skipped]
    interrupts = common.interrupts = labmod.Interrupts().install()
    results: list[dict[str, Any]] = []
    code = 0
    started = time.time()
    try:
        ensure_packages(args.baselines, args.skip_install)
        ok = run_rounds(plan_baselines(args, results) + plan_l3ptp(args, results), args.rounds, results)
        code = 0 if ok else 1
    except BenchError as exc:
        say(f"FAILED: {exc}")
        code = 1
    except subprocess.TimeoutExpired as exc:
        say(f"FAILED: timed out: {exc}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    if code == 130 or interrupts.hit:  # also when it only showed as a failed tool (exception lost in a fork hook)
        say("interrupted; everything started was stopped and removed")
        code = 130
    report = {
        "date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "machine": {"ncpu": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "cpu": _cpu_model()},
        "settings": {"seconds": args.seconds, "udp_rate": args.udp_rate, "udp_len": UDP_LEN,
                     "tunnel_mtu": TUNNEL_MTU, "l3ptp_mtu": args.mtu, "l3ptp_offload": args.offload,
                     "l3ptp_event_loop": args.event_loop, "pings": args.pings, "rounds": args.rounds},
        "commit": _commit(),
        "configs": results,
    }
    if results:
        at_defaults = [c for c in results if not c["name"].endswith(EQUAL_MTU_SUFFIX)]
        equal = [c for c in results if c["name"].endswith(EQUAL_MTU_SUFFIX)
                 or (c.get("kind") == "l3ptp" and c.get("mtu_setting", "1280") == "1280")]
        report["medians"] = {"defaults": aggregate(at_defaults, REFERENCE),
                             "equal_mtu": aggregate(equal, REFERENCE + EQUAL_MTU_SUFFIX)}
        print(f"\nmedian of {args.rounds} interleaved round(s) [lowest-highest]; ratios against {REFERENCE}'s "
              "figure of the same round, median [lowest-highest]", flush=True)
        print(f"\neach tunnel at its own defaults (what its users get), against {REFERENCE} at its defaults:")
        print(render_rounds_table(report["medians"]["defaults"]), flush=True)
        print(f"\nequal inner MTU {TUNNEL_MTU}, against {REFERENCE}{EQUAL_MTU_SUFFIX}:")
        print(render_rounds_table(report["medians"]["equal_mtu"]), flush=True)
        print("\n" + render_rounds_table(report["medians"]["defaults"], columns=DETAIL_COLUMNS), flush=True)
        l3 = [c for c in results if c.get("kind") == "l3ptp" and c.get("round") == args.rounds]
        if l3:
            print("\nbottlenecks (l3ptp):")
            for c in l3:
                print(render_bottleneck(c))
        for c in results:
            if c.get("kind") == "baseline" and c.get("cpu_shares_tcp1") and c.get("round") == args.rounds:
                print(f"{c['name']}: CPU during TCP x1, % of one core: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in sorted(c["cpu_shares_tcp1"].items(), key=lambda kv: -kv[1])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        say(f"results written to {args.json}")
    return code


def _commit() -> str | None:
    """The checkout's commit (and '+dirty' with uncommitted changes), for the record."""
    here = os.path.dirname(os.path.abspath(__file__))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in read_proc("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
