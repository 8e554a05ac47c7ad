"""The helper's process life: systemd socket activation and `--cleanup`, each run for
real inside a test network namespace (the helper reconciles at start: never in the host's)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from l3ptp.ipc.helper_messages import ListNetworks, NetworkList, Role, Welcome
from lab.netns import ip, ip_json, setns
from tests.support.helper_fixtures import Client, HelperProcess, json_records

pytestmark = pytest.mark.privileged

# What systemd does between fork and exec: the listening socket at fd 3, LISTEN_PID = own pid.
ACTIVATE = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
            "os.execv(sys.executable, [sys.executable, '-m', 'l3ptp.helper', *sys.argv[2:]])")


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="l3ptp-helper-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_socket_activation_serves_on_fd_3(netns, workdir) -> None:
    h = HelperProcess(netns, workdir, controller_uids=[0], worker_uids=[0])  # writes the policy file
    path = os.path.join(workdir, "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(4)
    log = os.path.join(workdir, "activated.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(listener.fileno()), "--policy", h.policy_path],
                                pass_fds=[listener.fileno()], preexec_fn=lambda: setns(netns), stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "L3PTP_LOG_FORMAT": "json"})
    listener.close()
    try:
        c = Client(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET), timeout=15)
        c.sock.connect(path)  # queued in the backlog until the helper accepts
        assert isinstance(c.hello(Role.CONTROLLER), Welcome)
        reply, _ = c.request(ListNetworks())
        assert isinstance(reply, NetworkList) and reply.networks == ()
        c.close()
        with open(log) as f:
            ready = [r for r in json_records(f) if r.get("event") == "helper_ready"]
        assert ready and ready[0]["socket"] == path
        assert not os.path.exists(h.socket_path)  # it bound nothing of its own
        with open(f"/proc/{proc.pid}/status") as f:
            assert "NoNewPrivs:\t1" in f.read()
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)


def test_cleanup_removes_exactly_our_leftovers(netns, workdir) -> None:
    ip("tuntap", "add", "dev", "l3p-old", "mode", "tun", netns=netns)          # ours: prefix + tun
    ip("tuntap", "add", "dev", "x-other", "mode", "tun", netns=netns)          # another prefix
    ip("link", "add", "l3p-veth", "type", "veth", "peer", "name", "d1", netns=netns)  # our prefix, not a tun
    for dev in ("l3p-old", "x-other", "l3p-veth", "d1"):
        ip("link", "set", dev, "up", netns=netns)
    ip("route", "add", "198.19.6.0/24", "dev", "l3p-old", "proto", "157", netns=netns)
    ip("route", "add", "198.19.7.0/24", "dev", "x-other", "proto", "157", netns=netns)  # ours by protocol
    ip("route", "add", "198.19.8.0/24", "dev", "x-other", "proto", "static", netns=netns)
    ip("route", "add", "198.19.9.0/24", "dev", "l3p-veth", "proto", "static", netns=netns)
    ip("rule", "add", "priority", "5157", "fwmark", "0x4c33", "lookup", "main", "protocol", "157", netns=netns)
    ip("rule", "add", "priority", "5157", "lookup", "main", "protocol", "static", netns=netns)
    h = HelperProcess(netns, workdir, controller_uids=[0], worker_uids=[0])
    done = subprocess.run([*h.argv, "--cleanup"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "L3PTP_LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stderr
    links = {link["ifname"] for link in ip_json("link", "show", netns=netns)}
    assert links == {"lo", "x-other", "l3p-veth", "d1"}
    routes = {r["dst"] for r in ip_json("-4", "route", "show", "table", "main", netns=netns)}
    assert routes == {"198.19.8.0/24", "198.19.9.0/24"}
    rules = [(r["priority"], r.get("protocol")) for r in ip_json("-4", "rule", "show", netns=netns)
             if r["priority"] == 5157]
    assert rules == [(5157, "static")]
    (record,) = [r for r in json_records((done.stdout + done.stderr).splitlines()) if r.get("action") == "cleanup"]
    assert record["links"] == ["l3p-old"] and sorted(record["routes"]) == ["198.19.6.0/24", "198.19.7.0/24"]
    assert record["rules"] == ["inet 5157: fwmark 0x4c33 lookup 254"]
    assert not os.path.exists(h.socket_path)  # it never listened
