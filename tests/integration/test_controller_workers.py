"""Real controller processes with real worker processes, without root.

Two nodes on one machine: controller "alpha" (network net0, role listen on
127.0.0.1) and controller "beta" (net0, role connect to it), each with its own
fake helper (`FakeHelperThread`: fake TUN queues over socketpairs), runtime
directory and key. Everything between them is real: the controller spawns
``python -m l3ptp.worker``, the workers claim their queue fds over the helper
socket, talk to the controller over ZeroMQ and to each other over QUIC on
loopback. The test reads state only through the real CLI (`status --json`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest

from l3ptp.ipc.constants import HANDOVER_GRACE
from tests.support.controller_process import (
    ControllerProcess,
    FakeHelperThread,
    free_udp_port,
    new_key_file,
    pid_alive,
    proc_status,
    wait_until,
    write_toml,
)
from tests.support.packets import ipv4_udp

pytestmark = pytest.mark.timeout(60)

NET = "net0"
ALPHA_V4, BETA_V4 = "198.19.0.1", "198.19.0.2"


@dataclass
class Node:
    name: str
    controller: ControllerProcess
    helper: FakeHelperThread


def _node_config(tmp: str, name: str, key: str, peer_fp: str, role: str, port: int) -> tuple[str, str]:
    base = os.path.join(tmp, name)
    runtime = os.path.join(base, "run")  # the controller creates it
    local, peer = (ALPHA_V4, BETA_V4) if role == "listen" else (BETA_V4, ALPHA_V4)
    underlay = {"local": "127.0.0.1", "port": port} if role == "listen" else {"peer": "127.0.0.1", "port": port}
    path = os.path.join(base, "l3ptp.toml")
    write_toml(
        path,
        {
            "node": {"id": name, "key_file": key},
            "controller": {
                "runtime_dir": runtime,
                "helper_socket": os.path.join(base, "helper.sock"),
                "status_interval": 0.2,
            },
            "metrics": {"enabled": False},
            "networks": {
                NET: {
                    "role": role,
                    "local_ipv4": f"{local}/30",
                    "peer_ipv4": f"{peer}/30",
                    "peer_key": peer_fp,
                    "keepalive_interval": 0.5,
                    "underlay": underlay,
                }
            },
        },
    )
    return path, runtime


@contextmanager
def two_nodes() -> Iterator[tuple[Node, Node]]:
    with tempfile.TemporaryDirectory(prefix="l3w-") as tmp, ExitStack() as stack:
        for name in ("alpha", "beta"):
            os.mkdir(os.path.join(tmp, name))
        keys = {n: os.path.join(tmp, n, "node.key") for n in ("alpha", "beta")}
        fps = {n: new_key_file(k) for n, k in keys.items()}
        port = free_udp_port()
        nodes = []
        for name, peer, role in (("alpha", "beta", "listen"), ("beta", "alpha", "connect")):
            config, runtime = _node_config(tmp, name, keys[name], fps[peer], role, port)
            helper = FakeHelperThread(os.path.join(tmp, name, "helper.sock")).start()
            stack.callback(helper.close)
            controller = ControllerProcess(config, runtime, os.path.join(tmp, name, "log.jsonl"))
            stack.callback(controller.cleanup)
            nodes.append(Node(name, controller, helper))
        for node in nodes:
            node.controller.start()
        yield nodes[0], nodes[1]


def _established(net: dict) -> bool:
    return net["state"] == "up" and all(q["state"] == "established" for q in net["queues"])


def _send(src: Node, dst: Node, count: int, src_ip: str, dst_ip: str) -> None:
    """Inject `count` packets into src's TUN; assert they come out of dst's TUN unchanged."""
    packets = [ipv4_udp(src_ip, dst_ip, f"probe {i}".encode()) for i in range(count)]
    src_tun, dst_tun = src.helper.tun(NET), dst.helper.tun(NET)
    for p in packets:
        src_tun.inject(p)
    got = dst_tun.wait_packets(count, timeout=10)
    assert got == packets, f"{len(got)} of {count} packets arrived\n{src.controller.log_tail()}"


def wait_gone(pids: set[int], timeout: float) -> None:
    """Until no pid of `pids` exists in /proc (they are not our children: nothing to reap)."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        assert time.monotonic() < deadline, {pid: proc_status(pid) for pid in pids if os.path.exists(f"/proc/{pid}")}
        time.sleep(0.1)


@pytest.mark.timeout(90)
def test_two_controllers_real_workers_traffic_kill9_and_sigterm() -> None:
    started = time.monotonic()
    with two_nodes() as (alpha, beta):
        a, b = alpha.controller, beta.controller

        # 1. Up: both controllers report the session established, with real pids.
        for node in (alpha, beta):
            net = node.controller.wait_network(NET, _established, 20, "session established")
            pid = net["queues"][0]["pid"]
            assert pid_alive(pid) and pid != node.controller.pid
            zygote = int(proc_status(pid)["PPid"])  # forked by the controller's fork server, its child
            assert proc_status(zygote)["Name"] == "l3ptp-zygote", proc_status(zygote)
            assert proc_status(zygote)["PPid"] == str(node.controller.pid)
            assert proc_status(pid)["NoNewPrivs"] == "1"
            assert net["restarts"] == 0
        assert alpha.helper.call(lambda: list(alpha.helper.helper.claims)) == [(NET, 0)]

        # 2. Traffic alpha -> beta through the real data path; the counters show it.
        _send(alpha, beta, 5, ALPHA_V4, BETA_V4)
        a_net = a.wait_network(NET, lambda n: n["counters"].get("tun_rx_packets") == 5, 5, "alpha tun_rx 5")
        assert a_net["counters"]["dgram_tx_packets"] >= 5
        b_net = b.wait_network(NET, lambda n: n["counters"].get("tun_tx_packets") == 5, 5, "beta tun_tx 5")
        assert b_net["counters"]["dgram_rx_packets"] >= 5
        assert b_net["queues"][0]["counters"]["tun_tx_packets"] == 5
        # The same through the `l3ptp` command as its own process.
        cmd = [sys.executable, "-m", "l3ptp.controller.cli", "--runtime-dir", a.runtime_dir, "status", "--json"]
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        assert shown.returncode == 0, shown.stderr
        (a_shown,) = json.loads(shown.stdout)["networks"]
        assert a_shown["state"] == "up" and a_shown["counters"]["tun_rx_packets"] == 5
        assert a_shown["queues"][0]["pid"] == a_net["queues"][0]["pid"]

        # 3. kill -9 of beta's worker: restarted (new pid), restarts 1, tunnel back.
        old = b_net["queues"][0]["pid"]
        os.kill(old, signal.SIGKILL)
        b_net = b.wait_network(
            NET,
            lambda n: n["queues"][0]["pid"] not in (0, old) and n["restarts"] == 1 and _established(n),
            20,
            "worker restarted and re-established",
        )
        new = b_net["queues"][0]["pid"]
        assert b_net["queues"][0]["restarts"] == 1
        assert not pid_alive(old) and pid_alive(new)
        assert beta.helper.call(lambda: list(beta.helper.helper.claims)) == [(NET, 0), (NET, 0)]
        # The new worker got the helper's kept queue fd: traffic flows both ways.
        a.wait_network(NET, _established, 20, "alpha re-established")
        _send(beta, alpha, 3, BETA_V4, ALPHA_V4)
        b.wait_network(NET, lambda n: n["counters"].get("tun_rx_packets") == 3, 5, "new beta worker tun_rx 3")
        _send(alpha, beta, 2, ALPHA_V4, BETA_V4)
        assert b.network(NET)["restarts"] == 1  # type: ignore[index]

        # 4. SIGTERM: exit 0; the running workers are handed over (still running), and with no next
        # controller they end by themselves within HANDOVER_GRACE; then every worker pid either
        # controller ran is gone.
        pids = a.seen_pids | b.seen_pids
        assert len(pids) == 3  # alpha's worker, beta's first and second
        running = {a_net["queues"][0]["pid"], new}
        for ctl in (a, b):
            assert ctl.terminate() == 0, ctl.log_tail()
        assert all(pid_alive(pid) for pid in running)
        handover_wait = time.monotonic()
        wait_gone(pids, HANDOVER_GRACE + 5)
        handover_wait = time.monotonic() - handover_wait
        for pid in pids | {a.pid, b.pid}:
            assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} still exists: {proc_status(pid)}"
        assert alpha.helper.networks() == ["net0"] and beta.helper.networks() == ["net0"]  # kept: fail-closed
        for ctl in (a, b):
            assert ctl.events("controller_ready") and ctl.events("controller_stopping")
            assert not os.path.exists(os.path.join(ctl.runtime_dir, "control.sock"))
            assert ctl.events("worker_handed_over")
    assert time.monotonic() - started - handover_wait < 45


def test_controller_process_sets_no_new_privs() -> None:
    with two_nodes() as (alpha, _beta):
        wait_until(lambda: alpha.controller.status() is not None, 20, "controller answers", alpha.controller.log_tail)
        status = proc_status(alpha.controller.pid)
        assert status["NoNewPrivs"] == "1"
        if os.getuid() != 0:
            # PR_SET_DUMPABLE=0: /proc/<pid> then belongs to root.
            assert os.stat(f"/proc/{alpha.controller.pid}").st_uid == 0
        assert alpha.controller.terminate() == 0


def test_harden_process_sets_no_new_privs_and_not_dumpable() -> None:
    code = (
        "import ctypes, ctypes.util\n"
        "from l3ptp.controller.app import harden_process\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"  # PR_GET_DUMPABLE
        "harden_process()\n"
        "nnp = [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs:')][0]\n"
        "print(before, libc.prctl(3, 0, 0, 0, 0), nnp)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split() == ["1", "0", "1"], out.stderr


def _listen_net(index: int, port: int, peer_fp: str) -> dict:
    return {
        "role": "listen",
        "local_ipv4": f"198.19.{index}.1/30",
        "peer_ipv4": f"198.19.{index}.2/30",
        "peer_key": peer_fp,
        "keepalive_interval": 0.5,
        "underlay": {"local": "127.0.0.1", "port": port},
    }


def _live_pid(net: dict) -> int:
    """The queue-0 pid once that worker has reported (0 before)."""
    q = net["queues"][0]
    return int(q["pid"]) if q["pid"] and q["state"] != "starting" else 0


@pytest.mark.timeout(90)
def test_sighup_applies_the_diff_and_refuses_an_invalid_file() -> None:
    with tempfile.TemporaryDirectory(prefix="l3h-") as tmp, ExitStack() as stack:
        key = os.path.join(tmp, "node.key")
        peer_fp = new_key_file(os.path.join(tmp, "peer.key"))
        new_key_file(key)
        runtime = os.path.join(tmp, "run")
        config = os.path.join(tmp, "l3ptp.toml")
        base = {
            "node": {"id": "alpha", "key_file": key},
            "controller": {
                "runtime_dir": runtime,
                "helper_socket": os.path.join(tmp, "helper.sock"),
                "status_interval": 0.2,
            },
            "metrics": {"enabled": False},
        }
        ports = {name: free_udp_port() for name in ("keep", "drop", "added")}
        nets = {n: _listen_net(i + 1, ports[n], peer_fp) for i, n in enumerate(("keep", "drop", "added"))}
        write_toml(config, {**base, "networks": {"keep": nets["keep"], "drop": nets["drop"]}})
        helper = FakeHelperThread(os.path.join(tmp, "helper.sock")).start()
        stack.callback(helper.close)
        ctl = ControllerProcess(config, runtime, os.path.join(tmp, "log.jsonl"))
        stack.callback(ctl.cleanup)
        ctl.start()

        def pids(data: dict) -> dict[str, int]:
            return {n["name"]: _live_pid(n) for n in data["networks"]}

        before = pids(ctl.wait_status(lambda d: all(pids(d).values()) and len(d["networks"]) == 2, 20, "2 workers"))
        assert sorted(helper.networks()) == ["drop", "keep"]

        # add "added", remove "drop", leave "keep" as it is; SIGHUP.
        write_toml(config, {**base, "networks": {"keep": nets["keep"], "added": nets["added"]}})
        os.kill(ctl.pid, signal.SIGHUP)
        after = pids(
            ctl.wait_status(
                lambda d: [n["name"] for n in d["networks"]] == ["keep", "added"] and all(pids(d).values()),
                20,
                "reload applied",
            )
        )
        assert after["keep"] == before["keep"], "the unchanged network's worker was restarted"
        assert pid_alive(after["keep"]) and pid_alive(after["added"])
        wait_until(lambda: not pid_alive(before["drop"]), 10, "the removed network's worker to exit")
        assert sorted(helper.networks()) == ["added", "keep"]
        reloaded = ctl.events("reloaded")
        assert len(reloaded) == 1 and "added" in reloaded[0]["summary"] and "drop" in reloaded[0]["summary"]

        # An invalid file (two errors; it would also remove "added"): nothing changes, errors logged.
        bad_keep = {**nets["keep"], "mtu": 70000}
        bad_drop = {**nets["drop"], "mttu": 1280}
        write_toml(config, {**base, "networks": {"keep": bad_keep, "drop": bad_drop}})
        os.kill(ctl.pid, signal.SIGHUP)
        rejected = wait_until(lambda: ctl.events("reload_rejected"), 10, "reload_rejected logged", ctl.log_tail)
        errors = "\n".join(rejected[0]["errors"])
        assert "networks.keep.mtu" in errors and "mttu" in errors
        time.sleep(0.5)  # would any change still be on its way?
        data = ctl.status()
        assert data is not None and pids(data) == after
        assert sorted(helper.networks()) == ["added", "keep"]
        assert len(ctl.events("reloaded")) == 1
        rc, out, _ = ctl.cli("status")
        assert rc == 0 and "network: added" in out and "network: drop" not in out

        assert ctl.terminate() == 0, ctl.log_tail()
        wait_gone(ctl.seen_pids, HANDOVER_GRACE + 5)  # handed over, no next controller: they end
        for pid in ctl.seen_pids:
            assert not os.path.exists(f"/proc/{pid}")
