"""End to end: the whole system in two network namespaces, as `make demo` runs it.

Real multi-queue TUN devices, real routes, real processes with real
privileges (helper with CAP_NET_ADMIN and CAP_BPF only, controller and workers as an
unprivileged uid), real traffic from ping and iperf3. Everything through
`lab.hosts` (the top-level harness), which the demo and the benchmark use too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l3ptp.ipc.constants import RTPROT_L3PTP
from lab import hosts as labmod
from lab.hosts import BEHIND, Host, Lab
from tests.support.controller_process import pid_alive, proc_status, wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

IFNAME = "l3p-demo"
CAP_NET_ADMIN_BIT = 1 << 12 | 1 << 39  # CAP_NET_ADMIN and CAP_BPF (the shared port's steering)


def _lab(setup: Any = None, **kw: Any) -> Iterator[Lab]:
    lab = Lab(**kw)
    try:
        lab.build()
        if setup is not None:
            setup(lab)
        lab.start(wait=40)
        yield lab
    finally:
        lab.close()
        for host in lab.hosts.values():
            assert not os.path.exists(f"/run/netns/{host.netns}"), "lab left a namespace behind"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from _lab(queues=2)


def wait_for(what: str, cond: Any, timeout: float = 30.0, every: float = 0.2, lab: Lab | None = None) -> Any:
    """`wait_until`, polling every `every` s, with the lab's controller and helper logs on failure."""
    log = None
    if lab is not None:
        log = lambda: "\n".join(lab.tail(h, w, 40) for h in lab.hosts.values() for w in ("controller", "helper"))  # noqa: E731
    return wait_until(cond, timeout, what, log=log, every=every)


def totals(lab: Lab, host: Host) -> dict[str, int]:
    return lab.network(host)["counters"]


def drops(lab: Lab, host: Host) -> dict[str, int]:
    return lab.network(host)["drops"]


def our_routes(lab: Lab, host: Host) -> set[str]:
    return {r["dst"] for r in lab.routes(host, proto=RTPROT_L3PTP)}


# ---- traffic -------------------------------------------------------------------


def test_ping_both_families_both_ways(lab: Lab) -> None:
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        for addr in (dst.overlay4, dst.overlay6):
            res = lab.ping(src, addr, count=3)
            assert " 0% packet loss" in res.stdout, res.stdout


def test_iperf3_tcp_and_udp_counted_on_both_sides(lab: Lab) -> None:
    before_a, before_b = totals(lab, lab.a), totals(lab, lab.b)
    tcp = lab.iperf3(lab.a, lab.b, seconds=2)
    assert tcp["end"]["sum_received"]["bytes"] > 1_000_000
    udp = lab.iperf3(lab.b, lab.a, seconds=2, udp_rate="50M")
    assert udp["end"]["sum"]["packets"] > 1000
    assert udp["end"]["sum"]["lost_percent"] < 5.0

    def grown() -> bool:
        a, b = totals(lab, lab.a), totals(lab, lab.b)
        return (a["dgram_tx_bytes"] - before_a["dgram_tx_bytes"] >= tcp["end"]["sum_received"]["bytes"]
                and b["tun_tx_bytes"] - before_b["tun_tx_bytes"] >= tcp["end"]["sum_received"]["bytes"]
                and b["dgram_tx_packets"] - before_b["dgram_tx_packets"] >= udp["end"]["sum"]["packets"] // 2
                and a["tun_tx_packets"] - before_a["tun_tx_packets"] >= udp["end"]["sum"]["packets"] // 2)

    # Workers report every status_interval: the totals catch up within seconds.
    wait_for("iperf3 traffic in l3ptp status on both sides", grown, timeout=10)
    code, out, err = lab.cli(lab.a, "status")
    assert code == 0, err
    assert "state: up" in out and "mtu: 1280" in out


def test_status_mtu_is_the_interface_mtu(lab: Lab) -> None:
    for host in lab.hosts.values():
        net = lab.network(host)
        assert net["mtu"] == 1280
        assert all(q["mtu"] == 1280 for q in net["queues"])
        assert lab.links(host)[IFNAME]["mtu"] == net["mtu"]


def test_advertised_routes_installed_on_both_sides_and_carry_traffic(lab: Lab) -> None:
    for host, peer in ((lab.a, lab.b), (lab.b, lab.a)):
        want = set(labmod.behind_prefixes(peer.name))
        routes = [r for r in lab.routes(host, proto=RTPROT_L3PTP) if r["dst"] in want]
        assert {r["dst"] for r in routes} == want
        assert all(r["dev"] == IFNAME for r in routes)
        assert set(lab.network(host)["routes"]) == want
        # Source and destination both behind the two ends: only the installed routes carry it.
        src4, src6 = BEHIND[host.name]
        dst4, dst6 = BEHIND[peer.name]
        for src, dst in ((src4, dst4), (src6, dst6)):
            res = lab.run(host, ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "-I", src, dst], timeout=20)
            assert " 0% packet loss" in res.stdout


def test_processes_run_with_least_privilege(lab: Lab) -> None:
    for host in lab.hosts.values():
        pids = lab.pids(host)
        assert len(pids["workers"]) == 2
        for pid in [pids["controller"], *pids["workers"]]:
            st = proc_status(pid)
            uids = st["Uid"].split()
            assert all(int(u) == lab.controller_uid for u in uids), st["Uid"]
            assert int(uids[0]) != 0
            assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, (pid, st["CapEff"])
            assert st["NoNewPrivs"].strip() == "1", pid
        hst = proc_status(pids["helper"])
        assert int(hst["CapEff"], 16) == CAP_NET_ADMIN_BIT, hst["CapEff"]
        assert int(hst["CapPrm"], 16) == CAP_NET_ADMIN_BIT
        assert int(hst["CapBnd"], 16) == CAP_NET_ADMIN_BIT
        assert hst["NoNewPrivs"].strip() == "1"


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[1])


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return out


def test_workers_are_forked_by_the_zygote_and_hold_only_their_own_queue(lab: Lab) -> None:
    """The fork server: each worker is a child of the controller's zygote (not of the controller), with
    one TUN queue, none of the zygote's fds (its socket to the controller, the pidfds of its children),
    and the same uid, no capabilities and no_new_privs (test_processes_run_with_least_privilege)."""
    for host in lab.hosts.values():
        pids = lab.pids(host)
        zygotes = {_ppid(w) for w in pids["workers"]}
        assert len(zygotes) == 1, zygotes
        zygote = zygotes.pop()
        with open(f"/proc/{zygote}/comm") as f:
            assert f.read().strip() == "l3ptp-zygote"
        assert _ppid(zygote) == pids["controller"]
        zst = proc_status(zygote)  # holds nothing: the controller's uid, no capability, no TUN queue
        assert all(int(u) == lab.controller_uid for u in zst["Uid"].split())
        assert int(zst["CapEff"], 16) == 0 and int(zst["CapPrm"], 16) == 0 and zst["NoNewPrivs"].strip() == "1"
        assert os.stat(f"/proc/{zygote}/status").st_uid == 0  # not dumpable: its /proc files are root's
        zfds = _fds(zygote)
        assert "/dev/net/tun" not in zfds.values()
        zygote_own = {t for t in zfds.values() if t.startswith(("socket:", "anon_inode:[pidfd]", "anon_inode:[eventpoll]"))}
        for w in pids["workers"]:
            with open(f"/proc/{w}/comm") as f:
                assert f.read().strip() == "l3ptp-worker"
            assert os.stat(f"/proc/{w}/status").st_uid == lab.controller_uid  # dumpable, as an exec'd worker
            fds = _fds(w)
            assert list(fds.values()).count("/dev/net/tun") == 1, fds
            assert not {t for t in fds.values() if t.startswith("socket:")} & zygote_own, (fds, zfds)
            assert "anon_inode:[pidfd]" not in fds.values() and fds[0].startswith("pipe:")
            with open(f"/proc/{w}/fdinfo/{next(fd for fd, t in fds.items() if t == '/dev/net/tun')}") as f:
                assert f"iff:\t{IFNAME}" in f.read()


def test_kill_9_worker_during_iperf3_restarts_and_keeps_the_interface(lab: Lab) -> None:
    ifindex = lab.links(lab.a)[IFNAME]["index"]
    seen_missing = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            link = lab.links(lab.a).get(IFNAME)
            if link is None or link["index"] != ifindex:
                seen_missing.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        before = {q["queue"]: q for q in lab.network(lab.a)["queues"]}
        victim_queue = 0
        victim = before[victim_queue]["pid"]
        result: dict[str, Any] = {}

        def traffic() -> None:
            try:
                result["tcp"] = lab.iperf3(lab.a, lab.b, seconds=4, streams=2)
            except labmod.LabError as exc:  # a stream on the killed queue may stall; we only need load
                result["error"] = str(exc)

        load = threading.Thread(target=traffic)
        load.start()
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        load.join(60)

        def restarted() -> dict[str, Any] | None:
            q = {q["queue"]: q for q in lab.network(lab.a)["queues"]}[victim_queue]
            if q["pid"] not in (0, victim) and q["state"] == "established" and q["restarts"] >= 1:
                return q
            return None

        q = wait_for("the killed worker's queue restarted and established again", restarted, timeout=45)
        assert not pid_alive(victim)
        assert lab.network(lab.a)["restarts"] >= 1
        lab.wait_established(30)
        # Traffic resumes on every queue: several flows hash over both queues.
        after = lab.iperf3(lab.a, lab.b, seconds=2, streams=4)
        assert after["end"]["sum_received"]["bytes"] > 100_000
        assert q["restarts"] >= 1
    finally:
        stop.set()
        watcher.join(5)
    assert not seen_missing.is_set(), "the TUN interface disappeared or was recreated while a worker restarted"


# ---- MTU -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtu_lab() -> Iterator[Lab]:
    # Host b asks for 1400 (with a budget that allows it); a asks for 1280: 1280 is agreed.
    yield from _lab(queues=1, config_b={"mtu": 1400, "max_datagram_size": 1500})


def test_mtu_1280_crosses_larger_is_fragmented_or_answered_with_icmp(mtu_lab: Lab) -> None:
    """b's interface MTU is 1400 but 1280 was agreed. b's worker handles a larger
    packet like a router: IPv4 without DF is fragmented and crosses; with DF (and
    IPv6) it is dropped, counted and answered with ICMP "too big" (mtu 1280), so
    b's kernel learns the path MTU instead of sending into a black hole."""
    lab = mtu_lab
    for host in lab.hosts.values():
        assert lab.network(host)["mtu"] == 1280
    assert lab.links(lab.b)[IFNAME]["mtu"] == 1400
    # 1280-byte IPv4 packets (1252 + 8 ICMP + 20 IP) with DF cross both ways.
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        res = lab.ping(src, dst.overlay4, count=3, size=1252, df=True)
        assert " 0% packet loss" in res.stdout
    before = drops(lab, lab.b).get("tun_oversize", 0)
    # Without DF (before any DF ping teaches b's kernel the path MTU): b's worker
    # fragments the 1400-byte packets to fit, like a router; a reassembles and answers.
    res = lab.run(lab.b, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-M", "dont", "-s", "1372",
                          lab.a.overlay4], timeout=20)
    assert " 0% packet loss" in res.stdout and "1380 bytes from" in res.stdout, res.stdout
    assert drops(lab, lab.b).get("tun_oversize", 0) == before
    res = lab.ping(lab.b, lab.a.overlay4, count=3, size=1372, df=True, check=False)  # 1400 bytes
    assert res.returncode != 0 and " 100% packet loss" in res.stdout
    assert f"From {lab.a.overlay4} icmp_seq=1 Frag needed and DF set (mtu = 1280)" in res.stdout, res.stdout
    wait_for("tun_oversize drops counted on b", lambda: drops(lab, lab.b).get("tun_oversize", 0) - before >= 1,
             timeout=10)
    # IPv6 (no DF): the first one is answered with "packet too big", then b's kernel
    # fragments to the learnt path MTU and the same pings get through.
    res = lab.ping(lab.b, lab.a.overlay6, count=3, size=1352, check=False)  # 1400 bytes of IPv6
    assert f"From {lab.a.overlay6} icmp_seq=1 Packet too big: mtu=1280" in res.stdout, res.stdout
    assert "1360 bytes from" in res.stdout, res.stdout


# ---- anti-spoofing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spoof_lab() -> Iterator[Lab]:
    # b (mis)configured to send from 198.19.77.0/24, which a never accepts.
    yield from _lab(queues=1, config_b={"advertised_routes": [*labmod.behind_prefixes("b"), "198.19.77.0/24"]},
                    setup=lambda lab: lab.add_address(lab.b, "198.19.77.1"))


def test_spoofed_sources_from_peer_are_dropped_and_counted(spoof_lab: Lab) -> None:
    lab = spoof_lab
    assert "198.19.77.0/24" not in our_routes(lab, lab.a)  # refused, not installed
    rx_before = lab.links(lab.a)[IFNAME]["rx_packets"]
    drops_before = sum(drops(lab, lab.a).values())
    count = 5
    # The packets leave b's tunnel (their source is one b advertises) ...
    tx_b_before = totals(lab, lab.b)["dgram_tx_packets"]
    lab.run(lab.b, ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", "-I", "198.19.77.1", lab.a.overlay4],
            check=False, timeout=20)
    wait_for("b sent the spoofed packets", lambda: totals(lab, lab.b)["dgram_tx_packets"] - tx_b_before >= count,
             timeout=10)
    # ... and a drops them with a named counter; none reach a's TUN.
    wait_for("a counted the drops", lambda: sum(drops(lab, lab.a).values()) - drops_before >= count, timeout=10)
    d = drops(lab, lab.a)
    assert d.get("dgram_src_not_allowed", 0) >= count, d
    assert lab.links(lab.a)[IFNAME]["rx_packets"] == rx_before
    # Legitimate traffic still flows.
    assert " 0% packet loss" in lab.ping(lab.b, lab.a.overlay4, count=2).stdout


# ---- default route ---------------------------------------------------------------------


def test_default_route_through_tunnel_without_looping_the_underlay() -> None:
    only_b = "198.19.30.1"  # on b's loopback; a has no route for it but the tunnel default
    for lab in _lab(
        queues=1,
        underlay_via_default_route=True,
        policy_extra={"allow_default_route": True, "route_table": 157},
        config_a={"allow_default_route": True, "accepted_routes": ["0.0.0.0/0", "::/0"]},
        config_b={"allow_default_route": True, "advertised_routes": ["0.0.0.0/0", "::/0"]},
        setup=lambda lab: lab.add_address(lab.b, only_b),
    ):
        assert "0.0.0.0/0" in our_routes(lab, lab.a)
        under_tx = lab.links(lab.a)["under0"]["tx_packets"]
        res = lab.ping(lab.a, only_b, count=5)
        assert " 0% packet loss" in res.stdout
        # The tunnel carried it, and the tunnel's own UDP still took the underlay.
        assert lab.links(lab.a)["under0"]["tx_packets"] - under_tx >= 5
        lab.wait_established(5)


# ---- lifecycle ---------------------------------------------------------------------------


def test_shutdown_removes_exactly_our_routes_and_20_up_down_cycles_leave_nothing() -> None:
    for lab in _lab(queues=1):
        # A route that is not ours, on the same namespace: it must survive everything.
        with labmod.netlink(lab.a.netns) as ipr:
            ipr.route("add", dst="198.19.99.0/24", oif=ipr.link_lookup(ifname="under0")[0], proto=4)
        def not_ours() -> set[str]:
            # The kernel's connected routes of our interface go with it; everything else must stay.
            return {r["dst"] for r in lab.routes(lab.a) if r["proto"] != RTPROT_L3PTP and not r["dev"].startswith("l3p-")}

        theirs = not_ours()
        assert "198.19.99.0/24" in theirs
        for i in range(20):
            code, out, err = lab.cli(lab.a, "down", "demo")
            assert code == 0, (i, out, err)
            wait_for("interface gone after down", lambda: IFNAME not in lab.links(lab.a), timeout=15)
            assert our_routes(lab, lab.a) == set(), i
            code, out, err = lab.cli(lab.a, "up", "demo")
            assert code == 0, (i, out, err)
            wait_for("interface back after up", lambda: IFNAME in lab.links(lab.a), timeout=15)
        lab.wait_established(30)
        assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay4, count=2).stdout
        assert len([n for n in lab.links(lab.a) if n.startswith("l3p-")]) == 1
        # Orderly stop keeps the network (fail-closed); --cleanup removes exactly ours, the rest stays.
        codes = lab.stop()
        assert codes["a.controller"] == 0 and codes["a.helper"] == 0, codes
        assert [n for n in lab.links(lab.a) if n.startswith("l3p-")] == [IFNAME]
        assert set(labmod.behind_prefixes("b")) <= our_routes(lab, lab.a)
        assert lab.cleanup_helper(lab.a) == 0
        assert our_routes(lab, lab.a) == set()
        assert not [n for n in lab.links(lab.a) if n.startswith("l3p-")]
        assert not_ours() == theirs


def test_kill_9_controller_then_restarted_controller_adopts_the_workers() -> None:
    for lab in _lab(queues=2):
        ifindex = lab.links(lab.a)[IFNAME]["index"]
        old = lab.pids(lab.a)
        zygote = _ppid(old["workers"][0])
        os.kill(old["controller"], signal.SIGKILL)
        lab.a.procs["controller"].wait(10)
        time.sleep(2)  # systemd's RestartSec
        assert all(pid_alive(p) for p in old["workers"])  # they outlive it
        assert not pid_alive(zygote)  # its fork server does not
        lab.start_controller(lab.a)
        lab.wait_established(40)
        new = lab.pids(lab.a)
        assert new["workers"] == old["workers"] and len(new["workers"]) == 2  # adopted, not respawned
        assert "worker_adopted" in lab.tail(lab.a, "controller", 100)
        assert [n for n in lab.links(lab.a) if n.startswith("l3p-")] == [IFNAME]
        assert lab.links(lab.a)[IFNAME]["index"] == ifindex
        assert our_routes(lab, lab.a) == set(labmod.behind_prefixes("b"))
        assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay6, count=2).stdout
        # An adopted worker that dies is respawned like a child.
        os.kill(old["workers"][0], signal.SIGKILL)
        wait_for("the adopted worker respawned", lambda: len(lab.pids(lab.a)["workers"]) == 2
                 and old["workers"][0] not in lab.pids(lab.a)["workers"], timeout=20, lab=lab)
        lab.wait_established(40)


def test_kill_9_helper_then_restarted_helper_adopts_the_network() -> None:
    for lab in _lab(queues=1):
        old_workers = lab.pids(lab.a)["workers"]
        ifindex = lab.links(lab.a)[IFNAME]["index"]
        os.kill(lab.a.procs["helper"].pid, signal.SIGKILL)
        lab.a.procs["helper"].wait(10)
        lab.start_helper(lab.a)
        # The restarted helper adopted the interface, its routes and kill switch; the workers never noticed.
        time.sleep(3)  # the controller probes the helper every 2 s
        assert lab.links(lab.a)[IFNAME]["index"] == ifindex
        assert lab.pids(lab.a)["workers"] == old_workers
        assert our_routes(lab, lab.a) == set(labmod.behind_prefixes("b"))
        assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay4, count=2).stdout
        assert " 0% packet loss" in lab.ping(lab.b, lab.a.overlay6, count=2).stdout
        # A worker restarted after the helper's restart gets an adopted queue (attached on claim).
        os.kill(old_workers[0], signal.SIGKILL)
        wait_for("the worker respawned", lambda: lab.pids(lab.a)["workers"] not in ([], old_workers), timeout=20,
                 lab=lab)
        lab.wait_established(40)
        assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay4, count=3).stdout


# ---- QUIC engines -------------------------------------------------------------------------


def _loaded(pid: int, needle: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(needle in line for line in f)


def test_configured_engines_are_used_and_interoperate() -> None:
    """a's workers run aioquic, b's qh3 (the `engine` key); the mixed pair carries traffic."""
    for lab in _lab(queues=1, config_a={"engine": "aioquic"}, config_b={"engine": "qh3"}):
        # Every worker loads both engines for its warm-up handshake (worker/__main__.py), so the engine
        # that carries the tunnel is the one its `worker_starting` line names.
        for host, want in ((lab.a, "aioquic"), (lab.b, "qh3")):
            (pid,) = lab.pids(host)["workers"]
            with open(host.logs["controller"], errors="replace") as f:
                events = [json.loads(line) for line in f if line.startswith("{")]
            starts = [e for e in events if e.get("event") == "worker_starting" and e.get("pid") == pid]
            assert [e["engine"] for e in starts] == [want], starts
        for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
            assert " 0% packet loss" in lab.ping(src, dst.overlay6, count=2).stdout
        tcp = lab.iperf3(lab.b, lab.a, seconds=1)
        assert tcp["end"]["sum_received"]["bytes"] > 100_000


def _cpus_allowed(pid: int) -> str:
    return proc_status(pid)["Cpus_allowed_list"].strip()


def test_workers_pinned_to_configured_cpus_and_event_loops_chosen() -> None:
    ncpu = os.cpu_count() or 1
    cpus = [ncpu - 1, 0]
    for lab in _lab(queues=2, config_a={"cpus": cpus, "event_loop": "uvloop"}, config_b={"event_loop": "asyncio"}):
        by_queue = {q["queue"]: q["pid"] for q in lab.network(lab.a)["queues"]}
        for queue, pid in by_queue.items():
            assert _cpus_allowed(pid) == str(cpus[queue % len(cpus)])
            assert _loaded(pid, "uvloop")
        for pid in lab.pids(lab.b)["workers"]:
            assert not _loaded(pid, "uvloop")
            assert _cpus_allowed(pid) == _cpus_allowed(os.getpid())  # not pinned
        assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay4, count=2).stdout


def test_reload_of_advertised_routes_reaches_the_peer_without_a_restart() -> None:
    """Only a's advertised routes change (`l3ptp reload`): b swaps the /24 for the
    narrower /25 in the same session, traffic takes it, no worker restarts anywhere."""
    for lab in _lab(queues=1):
        workers = {h.name: lab.pids(h)["workers"] for h in (lab.a, lab.b)}
        v4, v6 = labmod.behind_prefixes("a")
        narrower = v4.replace(".0/24", ".0/25")
        lab.write_config(lab.a, {**lab.a.network, "advertised_routes": [narrower, v6]}, lab.a.underlay_table)
        rc, out, err = lab.cli(lab.a, "reload")
        assert rc == 0 and "applied live: demo" in out, (out, err)
        wait_for("b to install the narrower route", lambda: our_routes(lab, lab.b) == {narrower, v6}, timeout=20,
                 lab=lab)
        assert {h.name: lab.pids(h)["workers"] for h in (lab.a, lab.b)} == workers
        assert set(lab.network(lab.b)["routes"]) == {narrower, v6}
        src, dst = BEHIND["b"][0], BEHIND["a"][0]
        res = lab.run(lab.b, ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "-I", src, dst], timeout=20)
        assert " 0% packet loss" in res.stdout


#: Where tests/support/hostile_peer.py's ROUTE_UPDATEs point (inside the lab's overlay range).
HOSTILE_ROUTES = ipaddress.ip_network("198.19.128.0/17")


def _hostile_peer(lab: Lab, mode: str, engine: str, rounds: int = 1) -> str:
    """Run tests/support/hostile_peer.py inside b's namespace against a's listener."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [mode, "--peer", lab.a.underlay, "--port", str(labmod.BASE_PORT), "--pin", lab.a.fingerprint,
            "--network", labmod.NETWORK, "--engine", engine, "--seconds", "10",
            "--address", f"{lab.b.overlay4}/30", "--address", f"{lab.b.overlay6}/64", "--rounds", str(rounds)]
    if mode != "stranger":
        args += ["--key", os.path.join(lab.b.dir, "etc", "node.key")]
    code = (f"import sys; sys.path.insert(0, {root!r}); from tests.support.hostile_peer import main; "
            f"sys.exit(main({args!r}))")
    return lab.run(lab.b, [sys.executable, "-c", code], timeout=30 + 15 * rounds).stdout


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
def test_words_of_a_stranger_stay_out_of_status_and_a_peers_are_shown_escaped(engine: str) -> None:
    """While b's controller is down, a client with a wrong key closes (CLOSE and
    QUIC CONNECTION_CLOSE) with ESC/BEL/CR and a bidi override in the reason:
    none of it reaches a's `l3ptp status`. Then a client holding b's pinned key
    establishes and closes with the same reason: `l3ptp status` prints it
    escaped and `status --json` stays valid JSON with the escaped text."""
    from tests.support.hostile_peer import HOSTILE_SHOWN

    if engine == "qh3":
        pytest.importorskip("qh3")
    for lab in _lab(queues=1, config_a={"engine": engine}, config_b={"engine": engine}):
        lab.stop_controller(lab.b)  # and its workers: the port is free
        wait_for("a to notice b is gone", lambda: lab.network(lab.a)["queues"][0]["state"] != "established",
                 timeout=20, lab=lab)
        out = _hostile_peer(lab, "stranger", engine)
        assert "close:" in out and "connection_close:" in out, out
        wait_for("a to report the stranger's close",
                 lambda: "withheld" in lab.network(lab.a)["queues"][0]["last_error"], timeout=10, lab=lab)
        for text in (lab.status_text(lab.a, verbose=True), json.dumps(lab.status(lab.a))):
            assert "owned" not in text and "\x1b" not in text, text
        out = _hostile_peer(lab, "authenticated", engine)
        assert "authenticated:" in out, out
        seen: list[Any] = []

        def reported() -> bool:
            seen[:] = [lab.network(lab.a)]
            return HOSTILE_SHOWN in seen[0]["last_error"]

        try:
            wait_for("a to report the peer's close", reported, timeout=20, lab=lab)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- hostile peer ---\n{out}\n--- a's status ---\n{seen}") from None
        rc, text, err = lab.cli(lab.a, "status", "-v")
        assert rc == 0, err
        assert f"peer closed: SHUTDOWN: {HOSTILE_SHOWN}" in text
        for raw in ("\x1b", "\x07", "\r", "\u202e"):
            assert raw not in text
        rc, text, err = lab.cli(lab.a, "status", "--json")
        assert rc == 0 and HOSTILE_SHOWN in json.loads(text)["networks"][0]["last_error"], err
        assert lab.network(lab.a)["state"] != "failed"


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
def test_routes_adding_up_past_the_limit_never_fail_the_network(engine: str) -> None:
    """The issue's attack: a peer holding the pinned key sends legal ROUTE_UPDATEs
    (200 prefixes each) adding up to 400 routes, again and again, more often
    than the crash limit. a's worker closes each such session with LIMIT and
    counts it; it never ends, so the network never becomes `failed`, and the
    real peer is served again afterwards."""
    from l3ptp.ipc.constants import RESTART_MAX_IN_WINDOW

    if engine == "qh3":
        pytest.importorskip("qh3")
    rounds = RESTART_MAX_IN_WINDOW + 1
    for lab in _lab(queues=1, config_a={"engine": engine}, config_b={"engine": engine}):
        (worker,) = lab.pids(lab.a)["workers"]
        lab.stop_controller(lab.b)  # and its workers: the port is free
        wait_for("a to notice b is gone", lambda: lab.network(lab.a)["queues"][0]["state"] != "established",
                 timeout=20, lab=lab)
        out = _hostile_peer(lab, "routes", engine, rounds=rounds)
        refusals = [line for line in out.splitlines() if line.startswith("routes:")]
        assert len(refusals) == rounds and all("more than 256" in r for r in refusals), out
        wait_for("a to count every refusal",
                 lambda: lab.network(lab.a)["counters"].get("peer_route_limit") == rounds, timeout=10, lab=lab)
        net = lab.network(lab.a)
        assert net["state"] != "failed" and net["restarts"] == 0, net
        assert lab.pids(lab.a)["workers"] == [worker]
        assert not [r for r in lab.routes(lab.a, proto=RTPROT_L3PTP)
                    if "." in r["dst"] and ipaddress.ip_network(r["dst"]).subnet_of(HOSTILE_ROUTES)]
        lab.start_controller(lab.b)
        lab.wait_established()
        assert " 0% packet loss" in lab.ping(lab.b, lab.a.overlay4, count=2).stdout
