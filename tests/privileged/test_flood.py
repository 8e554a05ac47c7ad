"""Handshake floods against a real listener (issue 14): the session survives.

Two namespaces run the whole stack (`lab.hosts`); from the connector's
namespace, i.e. from the peer's own address, a flooder sends QUIC Initials to
the listener's port from 256 source ports for FLOOD_SECONDS while ping
crosses the tunnel at 20 per second: Initial-looking junk, then real client
Initials replayed. The established session must keep carrying the pings,
stay the same session, and the listener worker's memory must come back.
The load is bounded in time; the rates reached are printed (`-s`) and in
docs/threat-model.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from l3ptp.ipc.constants import KEEPALIVE_INTERVAL_DEFAULT
from lab.hosts import BASE_PORT, Lab
from tests.privileged.test_e2e import _lab
from tests.support import flood as flood_mod

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

#: Bounded load; L3PTP_FLOOD_SECONDS=10 measures the issue's 10 s flood.
FLOOD_SECONDS = float(os.environ.get("L3PTP_FLOOD_SECONDS", "5"))
PING_INTERVAL = 0.05  # 20/s
#: Share of pings that must be answered during the flood. The target is 90%
#: and runs here answer 95-100% (docs/threat-model.md); the margin below it is
#: for a CI box loaded by other jobs. Before this change 0% were answered.
MIN_ANSWERED = 0.8
#: The issue's flood: ~200k datagrams/s (an idle CI machine's flooder reaches 330k/s unpaced, which
#: with `noise` measures how fast one Python process can drop datagrams, not the handshake defences).
FLOOD_RATE = 200_000
#: Listener worker RSS after the flood, candidates expired, vs before.
MAX_RSS_GROWTH = 10 * 1024 * 1024


@pytest.fixture(scope="module", params=["aioquic", "qh3"])
def lab(request: Any) -> Iterator[Lab]:
    # The default keepalive (the lab's 1 s makes the dead-peer bound 3 s): the
    # kernel drops part of a flood before the socket, the peer's packets with
    # it, and a lost keepalive held up behind a retransmission on the control
    # stream could then look like a dead peer within 3 s although the data
    # path carries on (seen once with qh3 at 200k/s).
    cfg = {"engine": request.param, "keepalive_interval": KEEPALIVE_INTERVAL_DEFAULT}
    yield from _lab(queues=1, config_a=cfg, config_b=cfg)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _udp_drops(lab: Lab) -> int:
    """Datagrams the kernel dropped at the listener's socket (buffer full)."""
    port = f":{BASE_PORT:04X} "
    for line in lab.run(lab.a, ["cat", "/proc/net/udp", "/proc/net/udp6"]).stdout.splitlines():
        fields = line.split()
        if len(fields) > 12 and fields[1].endswith(port):
            return int(fields[-1])
    return 0


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _queue(lab: Lab, host: Any) -> dict[str, Any]:
    (q,) = lab.network(host)["queues"]
    return q


def _flood_under_ping(lab: Lab, mode: str) -> dict[str, Any]:
    count = int(FLOOD_SECONDS / PING_INTERVAL)
    # At the lowest CPU priority: on a small loaded box a flooder at normal
    # priority takes the peer worker's CPU (which shares it), and the test
    # would measure the scheduler rather than the listener.
    flooder = lab.popen(lab.b, ["nice", "-n", "19", sys.executable, flood_mod.__file__, lab.a.underlay, str(BASE_PORT),
                                "--mode", mode, "--ports", "256", "--seconds", str(FLOOD_SECONDS),
                                "--bind", lab.b.underlay, "--rate", str(FLOOD_RATE)])
    time.sleep(0.5 if mode == "junk" else 1.5)  # the flood is on (replay makes its Initials first)
    ping = lab.run(lab.b, ["ping", "-n", "-q", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1",
                           lab.a.overlay4], check=False, timeout=FLOOD_SECONDS * 4)
    out, err = flooder.communicate(timeout=60)
    assert flooder.returncode == 0, err
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping.stdout)
    assert m, ping.stdout + ping.stderr
    return {"sent": int(m.group(1)), "answered": int(m.group(2)), "flood": json.loads(out)}


@pytest.mark.parametrize("mode", ["noise", "junk", "replay"])
def test_established_session_carries_pings_through_a_handshake_flood(lab: Lab, mode: str) -> None:
    (worker,) = lab.pids(lab.a)["workers"]
    before_q = _queue(lab, lab.a)
    assert before_q["state"] == "established"
    rss_before = _rss(worker)
    cpu_before, kernel_drops = _cpu(worker), _udp_drops(lab)
    result = _flood_under_ping(lab, mode)
    result["worker_cpu_s"] = round(_cpu(worker) - cpu_before, 2)
    result["socket_drops"] = _udp_drops(lab) - kernel_drops
    answered = result["answered"] / result["sent"]
    after_q = _queue(lab, lab.a)
    # The same worker and the same session: no restart, no reconnect, still up.
    assert lab.pids(lab.a)["workers"] == [worker]
    assert after_q["state"] == "established" and _queue(lab, lab.b)["state"] == "established", (
        result, {k: v for k, v in after_q["drops"].items() if v}, "a: " + after_q["last_error"],
        "b: " + _queue(lab, lab.b)["last_error"])
    assert after_q["restarts"] == before_q["restarts"] and after_q["peer"] == before_q["peer"], after_q
    drops = after_q["drops"]
    refused = sum(drops.get(k, 0) for k in ("initial_retry", "initial_over_budget", "initial_malformed"))
    refused_before = sum(before_q["drops"].get(k, 0) for k in ("initial_retry", "initial_over_budget",
                                                                "initial_malformed"))
    # Candidates expire (CANDIDATE_LIFETIME) and memory comes back.
    time.sleep(11)
    rss_after = _rss(worker)
    fl = result["flood"]
    print(f"\n[{mode}] flood {fl['rate']}/s for {fl['seconds']}s ({fl['sent']} Initials), "
          f"ping {result['answered']}/{result['sent']} = {answered:.1%}, refused {refused - refused_before}, "
          f"worker RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, worker CPU "
          f"{result['worker_cpu_s']}s, dropped by the kernel {result['socket_drops']}")
    if mode != "noise":
        assert refused - refused_before > 0, drops  # the flood reached the worker and was counted
    assert answered >= MIN_ANSWERED, result
    assert rss_after - rss_before <= MAX_RSS_GROWTH, (rss_before, rss_after)
