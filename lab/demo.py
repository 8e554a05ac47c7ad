"""`make demo` (`python -m lab.demo`): a dual-stack tunnel between two network namespaces.

Root only. Builds the `lab` (two namespaces joined by a veth underlay in
198.18.0.0/16), runs on each side the helper with CAP_NET_ADMIN and CAP_BPF only and the
controller and workers as an unprivileged uid, brings up one tunnel
(198.19.0.0/16 and fd00::/8, two queues by default), pings across in both
address families and both directions, runs a short iperf3 TCP and UDP test,
prints ``l3ptp status`` of both ends and tears everything down. Any failure
or Ctrl-C ends in the same full cleanup, which is then checked: no
namespace, link, route or process of the demo is left.

Exit status: 0 success, 1 a step failed, 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from lab import hosts as labmod

__all__ = ["main"]


def _say(line: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {line}", flush=True)


def _mbit(result: dict[str, Any], key: str = "sum_received") -> float:
    return float(result["end"][key]["bits_per_second"]) / 1e6


def run(args: argparse.Namespace, interrupts: labmod.Interrupts) -> int:
    from l3ptp.controller.cli import main as cli_main

    def say(line: str) -> None:  # every progress line is also a Ctrl-C checkpoint
        interrupts.check()
        _say(line)

    lab = labmod.Lab(queues=args.queues, say=say)
    pids: list[int] = []
    code = 1
    try:
        say("building two hosts (network namespaces) joined by a veth underlay")
        lab.build()
        say(f"unprivileged uid {lab.controller_uid} runs the controllers and workers; "
             f"helpers run as uid {lab.helper_uid} with CAP_NET_ADMIN and CAP_BPF only")
        lab.start(wait=args.timeout)
        for host in lab.hosts.values():  # the lab tracks what it started; workers are the controllers'
            pids += lab.pids(host)["workers"]
        say(f"tunnel established on {args.queues} queue(s); workers: "
             + ", ".join(f"{h.name}={lab.pids(h)['workers']}" for h in lab.hosts.values()))
        for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
            for addr in (dst.overlay4, dst.overlay6):
                res = lab.ping(src, addr, count=3)
                summary = [line for line in res.stdout.splitlines() if "packet loss" in line]
                say(f"ping {src.name} -> {dst.name} {addr}: {summary[0] if summary else 'ok'}")
        res = lab.ping(lab.a, labmod.REMOTE4, count=2)
        say(f"ping a -> {labmod.REMOTE4} (behind b, through the installed route): ok")
        tcp = lab.iperf3(lab.a, lab.b, seconds=args.seconds)
        say(f"iperf3 TCP a -> b, {args.seconds:g}s: {_mbit(tcp):.0f} Mbit/s")
        udp = lab.iperf3(lab.b, lab.a, seconds=args.seconds, udp_rate="100M")
        s = udp["end"]["sum"]
        say(f"iperf3 UDP b -> a at 100 Mbit/s, {args.seconds:g}s: {float(s['bits_per_second']) / 1e6:.0f} Mbit/s,"
             f" loss {float(s.get('lost_percent', 0.0)):.2f}%")
        for host in lab.hosts.values():
            print(f"\n$ l3ptp status   # on host {host.name}", flush=True)
            if cli_main(["--runtime-dir", host.runtime_dir, "status"]) != 0:
                raise labmod.LabError(f"l3ptp status failed on host {host.name}")
        print(flush=True)
        interrupts.check()
        code = 0
    except labmod.LabError as exc:
        if interrupts.hit:  # Ctrl-C reached the tool we were running too, and its exception was lost
            _say("interrupted")
            code = 130
        else:
            _say(f"FAILED: {exc}")
    except KeyboardInterrupt:
        _say("interrupted")
        code = 130
    finally:
        _say("tearing down: controllers (CLOSE to peers, workers stopped, networks destroyed), helpers, namespaces")
        left = lab.close_checked(pids)
        if left:
            _say("cleanup INCOMPLETE: " + ", ".join(left))
            code = code or 1
        else:
            _say("cleanup complete: no namespace, link, route or process left")
    if code == 0:
        _say("demo finished successfully")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=int, default=2, choices=range(1, 9), metavar="N",
                   help="queues (workers) per side, 1..8 (default 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each iperf3 run (default 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the tunnel (default 30)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.5 <= args.seconds <= 60:
        print("demo: --seconds must be within 0.5..60", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces and TUN devices)", file=sys.stderr)
        return 2
    return run(args, labmod.Interrupts().install())


if __name__ == "__main__":
    raise SystemExit(main())
