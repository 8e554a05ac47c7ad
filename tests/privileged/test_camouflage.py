"""Issue 15: a listener looks like the camouflage target to everyone but its peer, tested against software
nobody here wrote: hypercorn as the HTTP/3 target (its own certificate), niquests over qh3 as the prober.
The scenario (tests/support/camouflage.py) runs in this test's own network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest

from lab.netns import ip

pytestmark = pytest.mark.privileged

ADDRESS = "198.18.99.1"


@pytest.fixture(scope="module")
def outcome() -> dict:
    from lab.netns import NetnsRegistry

    reg = NetnsRegistry()
    ns = reg.create()
    try:
        ip("link", "set", "lo", "up", netns=ns)
        ip("addr", "add", f"{ADDRESS}/32", "dev", "lo", netns=ns)
        with tempfile.TemporaryDirectory(prefix="l3ptp-camouflage-") as workdir:
            res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.camouflage",
                                  "scenario", workdir, ADDRESS], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        reg.cleanup()


def test_a_real_http3_client_gets_the_targets_page_and_certificate(outcome: dict) -> None:
    probe = outcome["probe"]
    assert probe["status"] == 200 and probe["http_version"] == 30  # HTTP/3
    assert "the camouflage target's own page" in probe["body"]
    assert probe["fingerprint"] == outcome["target_fingerprint"]
    after = outcome["after_probe"]
    assert after["refused_bad_tag"] >= 1 and after["relay_flows"] >= 1 and after["relay_down_packets"] > 0
    assert "passed" not in after


def test_the_sealed_first_flight_of_the_peer_reaches_the_engine_and_nothing_else_does(outcome: dict) -> None:
    assert outcome["peer_passed"] and sum(outcome["peer_passed"]) >= 1
    assert outcome["final"]["passed"] == 2  # the two peers, never a prober or a flooder


def test_a_flood_of_unauthenticated_senders_stays_within_the_budgets(outcome: dict) -> None:
    flood = outcome["after_flood"]
    assert flood["relay_flows_open"] <= 64 and flood["relay_full"] > 0  # counted refusals, not growth
    assert flood["pending_senders"] <= 32
    assert outcome["peer2_passed"], "the peer did not get through during the flood"
    assert outcome["relay_peers"] == [f"{ADDRESS}:8443"], outcome["relay_peers"]  # only the target, ever
