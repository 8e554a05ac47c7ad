"""Memory of the l3ptp processes on the lab: ``python -m lab.bench.memory [--networks 10] [--queues 2]``.

Root only. Builds the two-host lab with `networks` networks (the lab's ``demo`` plus
``m1``..) of `queues` queues each, waits until every queue of every network is
established, then reads, for each host, every worker, the fork server (``l3ptp-zygote``,
if any), the controller and the helper: Pss and Rss from /proc/<pid>/smaps_rollup.

PSS (proportional set size) charges each page to the processes mapping it in equal parts,
so the sum over the workers and their zygote is what they cost together; divided by the
number of queues it is the cost per queue. Prints one JSON object; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from lab.hosts import BASE_PORT, Lab, workers_in
from lab.procs import alive

#: Each extra network i uses ports BASE_PORT + PORT_STEP * i .. (one per queue).
PORT_STEP = 10


def rollup(pid: int) -> dict[str, int]:
    """Pss and Rss in KiB from /proc/<pid>/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Rss", "Pss_Anon", "Pss_File", "Private_Dirty", "Shared_Clean", "Shared_Dirty"):
                out[key] = int(value.split()[0])
    return out


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def add_networks(lab: Lab, count: int) -> None:
    """Networks m1..m<count> (IPv4 overlay 198.19.<i>.0/30, no routes) besides ``demo``."""
    for host, peer in ((lab.a, lab.b), (lab.b, lab.a)):
        extra = {}
        for i in range(1, count + 1):
            side = 1 if host is lab.a else 2
            net = {k: v for k, v in host.network.items()
                   if k in ("role", "queues", "keepalive_interval", "peer_key", "engine")}
            net |= {"local_ipv4": f"198.19.{i}.{side}/30", "peer_ipv4": f"198.19.{i}.{3 - side}/30"}
            underlay = {**host.underlay_table, "port": BASE_PORT + PORT_STEP * i}
            extra[f"m{i}"] = (net, underlay)
        lab.write_config(host, host.network, host.underlay_table, networks=extra)


def wait_all(lab: Lab, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if all(lab.network(h, n)["queues"] and all(q["state"] == "established" for q in lab.network(h, n)["queues"])
                   and len(lab.network(h, n)["queues"]) == lab.queues for h in lab.hosts.values() for n in names):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"not every network established within {timeout:g}s")
        time.sleep(0.5)


def measure(lab: Lab) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for host in lab.hosts.values():
        workers = workers_in(host.netns)
        others = [p for p in workers_in(host.netns, spares=True) if p not in workers and alive(p)]
        w = [rollup(p) for p in workers]
        z = [rollup(p) for p in others if _comm(p) == "l3ptp-zygote"]
        ctl = rollup(host.procs["controller"].pid)
        helper = rollup(host.procs["helper"].pid)
        total = sum(r["Pss"] for r in w) + sum(r["Pss"] for r in z)
        out[host.name] = {
            "workers": len(w),
            "worker_pss_mib_mean": round(sum(r["Pss"] for r in w) / len(w) / 1024, 1),
            "worker_pss_mib_min_max": [round(min(r["Pss"] for r in w) / 1024, 1),
                                       round(max(r["Pss"] for r in w) / 1024, 1)],
            "worker_rss_mib_mean": round(sum(r["Rss"] for r in w) / len(w) / 1024, 1),
            "worker_private_dirty_mib_mean": round(sum(r["Private_Dirty"] for r in w) / len(w) / 1024, 1),
            "zygote_pss_mib": [round(r["Pss"] / 1024, 1) for r in z],
            "zygote_rss_mib": [round(r["Rss"] / 1024, 1) for r in z],
            "workers_and_zygote_pss_mib": round(total / 1024, 1),
            "pss_mib_per_queue": round(total / len(w) / 1024, 1),
            "controller_pss_mib": round(ctl["Pss"] / 1024, 1),
            "controller_rss_mib": round(ctl["Rss"] / 1024, 1),
            "helper_pss_mib": round(helper["Pss"] / 1024, 1),
            "helper_rss_mib": round(helper["Rss"] / 1024, 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench.memory")
    parser.add_argument("--networks", type=int, default=10)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after all are up")
    args = parser.parse_args(argv)
    with Lab(queues=args.queues, say=lambda line: print(line, file=sys.stderr)) as lab:
        lab.build()
        add_networks(lab, args.networks - 1)
        lab.start(wait=120)
        wait_all(lab, ["demo", *(f"m{i}" for i in range(1, args.networks))], 300)
        time.sleep(args.settle)  # past start-up: status reports, heartbeats, a few keepalives
        result = {"networks": args.networks, "queues": args.queues,
                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=os.path.dirname(__file__)).stdout.strip(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **measure(lab)}
        print(json.dumps(result, indent=1))
        lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
