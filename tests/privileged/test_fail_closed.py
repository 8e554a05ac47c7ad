"""Fail-closed across restarts and crashes (the kill switch), and how long traffic stops.

Host A's underlay is reachable only through default routes (IPv4 and IPv6), so any packet for the
tunnel's prefixes that is not routed into the tunnel leaves on the underlay in clear. A packet socket
(AF_PACKET, inside A's namespace) watches A's underlay for such packets while fast pings to the peer's
tunnel addresses and to the prefix behind it run, and each process of A is killed and restarted.
Zero such packets are allowed. The ping streams also give the longest pause in replies.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab import hosts as labmod
from lab.hosts import BEHIND, Lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4
TUNNEL = [ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("fd00::/8")]


class UnderlaySniffer:
    """Every frame leaving `ifname` in `netns`; those whose IP destination is in TUNNEL are leaks."""

    def __init__(self, netns: str, ifname: str = "under0") -> None:
        self.leaks: list[tuple[float, str]] = []
        self.frames = 0
        self._stop = threading.Event()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                labmod.setns(netns)  # this thread only
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                sock.bind((ifname, 0))
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            with sock:
                while not self._stop.is_set():
                    if not select.select([sock], [], [], 0.1)[0]:
                        continue
                    frame, addr = sock.recvfrom(65535)
                    if addr[2] == PACKET_OUTGOING:
                        self.frames += 1
                        self._check(frame)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]

    def _check(self, frame: bytes) -> None:
        kind = int.from_bytes(frame[12:14], "big")
        if kind == 0x0800 and len(frame) >= 34:
            dst = ipaddress.ip_address(frame[30:34])
        elif kind == 0x86DD and len(frame) >= 54:
            dst = ipaddress.ip_address(frame[38:54])
        else:
            return
        if any(dst in net for net in TUNNEL):
            self.leaks.append((time.monotonic(), str(dst)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Pinger:
    """`ping -D -i interval` from `host` to `dst`; `stop()` gives the reply times.

    Its output goes to a file: a pipe read only at the end fills after 64 KiB (about 20 s at 50/s) and
    then blocks ping, which would stop sending and show a pause that is not the tunnel's."""

    def __init__(self, lab: Lab, host: Any, dst: str, interval: float) -> None:
        self.out = tempfile.TemporaryFile("w+")
        self.proc = lab.popen(host, ["ping", "-n", "-D", "-i", str(interval), "-W", "1", dst], stdout=self.out)
        self.interval = interval

    def stop(self) -> list[float]:
        """Stop; the reply times (epoch seconds) in order."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=10)
        self.out.seek(0)
        out = self.out.read()
        self.out.close()
        return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest pause between replies received within [start, end] (epoch seconds), edges included."""
    inside = [start] + [t for t in times if start <= t <= end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:]))


def _underlay_behind_default_routes(lab: Lab) -> None:
    """IPv6 too: a default route on A through B's link-local address (IPv4's comes with the Lab option)."""
    with labmod.netlink(lab.b.netns) as ipr:
        index = ipr.link_lookup(ifname="under0")[0]
        (ll,) = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET6, index=index)
                 if a.get_attr("IFA_ADDRESS").startswith("fe80:")]
    with labmod.netlink(lab.a.netns) as ipr:
        ipr.route("add", dst="::/0", gateway=ll, oif=ipr.link_lookup(ifname="under0")[0])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(queues=2, underlay_via_default_route=True)
    try:
        lab.build()
        time.sleep(2)  # B's link-local address leaves DAD
        _underlay_behind_default_routes(lab)
        lab.start(wait=40)
        yield lab
    finally:
        lab.close()


def _settle(lab: Lab, after: str) -> None:
    lab.wait_established(40)
    for dst in (lab.b.overlay4, BEHIND["b"][1]):
        out = lab.ping(lab.a, dst, count=2).stdout
        assert " 0% packet loss" in out, (f"after {after}, to {dst}: {out}\n{lab.tail(lab.a, 'controller')}\n"
                                          f"{lab.tail(lab.b, 'controller')}")


def _phases(lab: Lab) -> list[tuple[str, Any]]:
    a = lab.a

    def helper_kill9() -> None:
        os.kill(a.procs["helper"].pid, signal.SIGKILL)
        a.procs["helper"].wait(10)
        time.sleep(1)
        lab.start_helper(a)
        time.sleep(3)  # the controller's helper probe (2 s) runs meanwhile

    def helper_restart() -> None:  # systemctl restart l3ptp-helper
        assert lab.stop_process(a, "helper") == 0
        lab.start_helper(a)
        time.sleep(3)

    def controller_kill9() -> None:
        os.kill(a.procs["controller"].pid, signal.SIGKILL)
        a.procs["controller"].wait(10)
        time.sleep(2)  # systemd's RestartSec
        lab.start_controller(a)

    def controller_restart() -> None:  # systemctl restart l3ptp-controller: workers handed over, network kept
        assert lab.stop_controller(a, handover=True) == 0
        lab.start_controller(a)

    def worker_kill9() -> None:
        for pid in lab.pids(a)["workers"]:
            os.kill(pid, signal.SIGKILL)
        time.sleep(2)

    return [("helper kill -9", helper_kill9), ("helper restart", helper_restart),
            ("controller kill -9", controller_kill9), ("controller restart", controller_restart),
            ("worker kill -9", worker_kill9)]


def test_no_packet_for_the_tunnel_prefixes_leaves_on_the_underlay_across_restarts(lab: Lab) -> None:
    sniffer = UnderlaySniffer(lab.a.netns)
    pingers = [Pinger(lab, lab.a, dst, 0.02) for dst in (lab.b.overlay4, BEHIND["b"][0])]
    pingers += [Pinger(lab, lab.a, dst, 0.05) for dst in (lab.b.overlay6, BEHIND["b"][1])]
    try:
        time.sleep(1)
        for name, phase in _phases(lab):
            phase()
            _settle(lab, name)
            assert sniffer.leaks == [], f"after {name}: {len(sniffer.leaks)} packets in clear, first {sniffer.leaks[:5]}"
    finally:
        replies = [p.stop() for p in pingers]
        sniffer.stop()
    assert sniffer.frames > 100  # it saw the underlay (the tunnel's own UDP)
    assert all(len(r) > 50 for r in replies), [len(r) for r in replies]
    assert sniffer.leaks == []


def carrying_worker(lab: Lab, host: Any = None) -> int:
    """The pid of `host`'s (default A's) worker whose TUN queue the running ping uses (its tun_rx_packets
    grow most: on A the requests, on B the replies)."""
    host = host or lab.a

    def counts() -> dict[int, int]:
        return {q["pid"]: q["counters"].get("tun_rx_packets", 0) for q in lab.network(host)["queues"]}

    before = counts()
    time.sleep(2.5)  # two status reports
    after = counts()
    return max(after, key=lambda pid: after[pid] - before.get(pid, 0))


#: Longest pause allowed across kill -9 of the controller or of a worker: the issue's target.
MAX_GAP = 1.0
#: kill -9 of the worker carrying the ping, this many times, alternating between A's (the listener:
#: the connector must learn of the new worker) and B's (the connector: its new worker dials at once).
WORKER_KILLS = 6
#: Seconds watched after each kill.
WATCH = 3.0


@pytest.mark.parametrize("what", ["controller", "controller-restart", "worker"])
def test_traffic_pauses_under_a_second_across_kill_9(lab: Lab, what: str) -> None:
    """kill -9 of the controller (restarted after systemd's RestartSec), an orderly restart of it
    (SIGTERM, then started again: `systemctl restart`), kill -9 of the worker carrying the ping."""
    _settle(lab, f"the previous test, before {what}")
    pinger = Pinger(lab, lab.a, lab.b.overlay4, 0.02)
    windows: list[tuple[str, float, float]] = []
    workers_before = lab.pids(lab.a)["workers"]
    try:
        if what == "controller":
            start = time.time()
            os.kill(lab.a.procs["controller"].pid, signal.SIGKILL)
            lab.a.procs["controller"].wait(10)
            time.sleep(2)  # systemd's RestartSec
            lab.start_controller(lab.a)
            time.sleep(5)
            windows.append(("controller (kill -9)", start, time.time()))
        elif what == "controller-restart":
            start = time.time()
            assert lab.stop_controller(lab.a, handover=True) == 0
            lab.start_controller(lab.a)
            time.sleep(5)
            windows.append(("controller (orderly restart)", start, time.time()))
        else:
            for i in range(WORKER_KILLS):
                host = (lab.a, lab.b)[i % 2]
                _settle(lab, f"worker kill {i} of {WORKER_KILLS}")
                # A worker killed before it ran RESTART_STABLE (3 s) would be restarted with a delay by
                # design (crash loop protection); each victim here ran over 5 s (the watch, the settle,
                # the 2.5 s measure).
                victim = carrying_worker(lab, host)
                start = time.time()
                os.kill(victim, signal.SIGKILL)
                time.sleep(WATCH)
                windows.append((f"{host.name}'s worker (kill -9 {i + 1})", start, time.time()))
    finally:
        replies = pinger.stop()
    gaps = [(name, longest_gap(replies, start, end)) for name, start, end in windows]
    for name, gap in gaps:
        print(f"longest pause in replies across {name}: {gap:.3f} s")
    if what.startswith("controller"):  # the workers outlived it and were adopted, not respawned
        assert lab.pids(lab.a)["workers"] == workers_before
    # The issue's target, every time. Before issue 13's fixes a worker's kill measured 0.36-0.63 s in
    # most runs but 1.1-1.2 s in some, and 2-3.5 s for a queue killed again within a minute.
    assert all(gap < MAX_GAP for _, gap in gaps), gaps
