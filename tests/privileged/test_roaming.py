"""Issue 18: the connector moves to a new underlay address during an iperf3 run (its routes now pick
198.18.0.3 as the source, as after a DHCP renewal or a NAT rebinding); the listener follows it by
connection ID: no new handshake, the iperf3 run goes on without a silent second."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from lab.hosts import Lab

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

NEW_SOURCE = "198.18.0.3"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # The listener filters nothing by address here (underlay.peer unset): an address change must pass.
    yield from Lab.started(queues=1, config_a={"underlay": {"peer": None}})


def queue(lab: Lab, host) -> dict:  # type: ignore[no-untyped-def]
    return lab.network(host)["queues"][0]


def test_a_new_source_address_mid_iperf3_keeps_the_session_and_the_traffic(lab: Lab) -> None:
    before = lab.network(lab.a)["counters"]
    peer_before = queue(lab, lab.a)["peer"]
    assert peer_before.startswith(lab.b.underlay), peer_before

    def move() -> None:
        time.sleep(2.0)
        for argv in (["ip", "-n", lab.b.netns, "addr", "add", f"{NEW_SOURCE}/24", "dev", "under0", "nodad"],
                     ["ip", "-n", lab.b.netns, "route", "replace", "198.18.0.0/24", "dev", "under0", "src",
                      NEW_SOURCE]):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)

    mover = threading.Thread(target=move)
    mover.start()
    result = lab.iperf3(lab.b, lab.a, seconds=6)
    mover.join()
    intervals = [iv["sum"]["bytes"] for iv in result["intervals"]]
    assert len(intervals) >= 6 and all(b > 0 for b in intervals), intervals  # no silent second
    after = lab.network(lab.a)["counters"]
    assert after.get("path_migrations", 0) == before.get("path_migrations", 0) + 1, after
    assert queue(lab, lab.a)["peer"].startswith(NEW_SOURCE), queue(lab, lab.a)
    log = lab.tail(lab.a, "controller", 400)
    assert "peer_migrated" in log
    assert log.count("session_established") == 1, log[-3000:]  # no new handshake
