"""Issue 18, item 3: both ends rotate their keys under traffic, the way an operator does it, with
`l3ptp reload` only: (1) each pins the other's new key beside the old one, (2) each key file gets the
new key, (3) the old keys are unpinned. Not one ping is lost, no worker restarts, and `l3ptp status`
shows the new key each peer proved and the renewals."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab.hosts import Host, Lab
from tests.support.controller_process import wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

#: Pings 20 ms apart for this long: the three reloads and their renewals happen within it.
PING_SECONDS = 24


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from Lab.started(queues=2)


def _new_key(lab: Lab, host: Host) -> tuple[str, str]:
    """A new key file beside `host`'s (owned like it); its path and fingerprint."""
    from l3ptp.worker import keys

    key = keys.generate_private_key()
    path = os.path.join(host.dir, "etc", "node.key.new")
    keys.save_private_key(key, path)
    st = os.stat(os.path.join(host.dir, "etc", "node.key"))
    os.chown(path, st.st_uid, st.st_gid)
    return path, keys.fingerprint(key)


def _reload(lab: Lab, host: Host, pins: list[str]) -> str:
    lab.write_config(host, {**host.network, "peer_key": pins[0], "peer_keys": pins}, host.underlay_table)
    rc, out, err = lab.cli(host, "reload")
    assert rc == 0, (out, err)
    return out


def _renewals(lab: Lab, host: Host) -> int:
    return lab.network(host)["counters"].get("renewals", 0)


def test_both_ends_rotate_their_keys_with_reloads_under_traffic_and_no_ping_is_lost(lab: Lab) -> None:
    workers = {h.name: lab.pids(h)["workers"] for h in (lab.a, lab.b)}
    old = {h.name: h.fingerprint for h in (lab.a, lab.b)}
    new = {h.name: _new_key(lab, h) for h in (lab.a, lab.b)}
    count = int(PING_SECONDS / 0.02)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", lab.b.netns, "ping", "-n", "-q", "-i", "0.02", "-c", str(count), "-W", "2",
         lab.a.overlay4],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(2)
        # 1. Pin the peer's new key beside the old one: nothing to renew.
        for h, peer in ((lab.a, lab.b), (lab.b, lab.a)):
            assert "applied live: demo" in _reload(lab, h, [old[peer.name], new[peer.name][1]])
        time.sleep(2)
        assert _renewals(lab, lab.a) == _renewals(lab, lab.b) == 0
        # 2. The new keys into the key files (same path, new contents): both sides renew.
        for h in (lab.a, lab.b):
            os.replace(new[h.name][0], os.path.join(h.dir, "etc", "node.key"))
            rc, out, err = lab.cli(h, "reload")
            assert rc == 0 and "applied live: demo" in out, (out, err)
        wait_until(lambda: all(lab.network(h)["peer_keys"] == [new[p.name][1]] for h, p in ((lab.a, lab.b), (lab.b, lab.a))),
                   40, "both peers to prove their new keys", every=0.2)
        # 3. Unpin the old keys.
        for h, peer in ((lab.a, lab.b), (lab.b, lab.a)):
            assert "applied live: demo" in _reload(lab, h, [new[peer.name][1]])
        out, _ = ping.communicate(timeout=PING_SECONDS + 30)
    finally:
        if ping.poll() is None:
            os.killpg(ping.pid, 9)
            ping.wait()
        assert ping.stdout is not None
        ping.stdout.close()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    assert int(m.group(1)) == count and int(m.group(2)) == count, out  # not one lost
    assert {h.name: lab.pids(h)["workers"] for h in (lab.a, lab.b)} == workers  # nothing restarted
    for h, peer in ((lab.a, lab.b), (lab.b, lab.a)):
        net = lab.network(h)
        assert net["peer_keys"] == [new[peer.name][1]]
        assert net["counters"]["renewals"] >= 2  # each queue moved at least once
        assert net["counters"].get("renew_failures", 0) == 0
        rc, text, _ = lab.cli(h, "status")
        assert rc == 0 and f"peer key: {new[peer.name][1]}, our key: {new[h.name][1]}" in text and "renewals:" in text
        assert net["local_key"] == new[h.name][1]
    # And the tunnel still works afterwards, with the new keys alone.
    assert " 0% packet loss" in lab.ping(lab.a, lab.b.overlay4, count=3).stdout
