"""Issue 18: the whole stack over an IPv6 underlay (fd00:18::/64 between the lab's two namespaces): the
tunnel comes up, carries both families both ways, and the workers talk to each other over IPv6."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.hosts import Lab
from lab.topology import UNDERLAY6

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from Lab.started(queues=2, underlay_ipv6=True)


def test_the_tunnel_runs_over_an_ipv6_underlay(lab: Lab) -> None:
    assert (lab.a.underlay, lab.b.underlay) == UNDERLAY6
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        for addr in (dst.overlay4, dst.overlay6):
            res = lab.ping(src, addr, count=3)
            assert " 0% packet loss" in res.stdout, res.stdout
    net = lab.network(lab.b)  # the connector: its queues' peer is the listener's IPv6 underlay address
    peers = {q["peer"] for q in net["queues"]}
    assert peers and all(UNDERLAY6[0] in p for p in peers), peers
    assert net["state"] == "up"
