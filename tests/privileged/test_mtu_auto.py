"""``mtu = "auto"`` end to end: two namespaces over a veth underlay of MTU 1500 (issue 16 item 3).

Both ends set ``mtu = "auto"``. Each controller asks the kernel for the route
MTU toward its peer (1500), derives the tunnel MTU (1412 over an IPv4
underlay, 1392 over IPv6), the helper creates the interface with it and the
session runs at it: a ping with DF of (MTU - 28) bytes of payload crosses,
one byte more is refused by the sending host's own stack ("message too long").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from l3ptp.controller import mtu as mtus
from lab.hosts import Lab
from tests.privileged.test_e2e import _lab, wait_for

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

IFNAME = "l3p-demo"
UNDERLAY_MTU = 1500  # a veth's default


#: (underlay IP version, the listener a has no underlay.peer)
@pytest.fixture(scope="module", params=[(4, False), (6, False), (4, True)],
                ids=["ipv4-underlay", "ipv6-underlay", "listener-without-peer"])
def auto_lab(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, int, bool]]:
    version, no_peer = request.param
    auto = {"mtu": "auto"}
    config_a = {**auto, "underlay": {"peer": None}} if no_peer else auto
    for lab in _lab(queues=1, underlay_ipv6=version == 6, config_a=config_a, config_b=auto):
        yield lab, version, no_peer


def test_the_interface_gets_the_derived_mtu_and_status_says_auto(auto_lab: tuple[Lab, int, bool]) -> None:
    lab, version, no_peer = auto_lab
    expected = mtus.derive(UNDERLAY_MTU, version).mtu
    assert expected == (1412 if version == 4 else 1392)
    lab.wait_established()
    for host, peer in ((lab.a, lab.b), (lab.b, lab.a)):
        links = lab.links(host)
        assert links["under0"]["mtu"] == UNDERLAY_MTU
        assert links[IFNAME]["mtu"] == expected
        net = wait_for("the session's MTU in status", lambda h=host: lab.network(h)["mtu"] == expected
                       and lab.network(h)["queues"][0]["mtu"] == expected and lab.network(h), lab=lab)
        assert (net["interface_mtu"], net["mtu_source"]) == (expected, "auto")
        where = f"toward {peer.underlay}"
        if host is lab.a and no_peer:
            # No peer to ask the route for: the largest MTU of a's interfaces (under0; not lo, not l3p-demo).
            where = "(largest interface MTU: a listener without underlay.peer)"
        assert net["mtu_note"] == f"path MTU {UNDERLAY_MTU} {where}"
        text = lab.status_text(host)
        assert f"  mtu: {expected} (auto: path MTU {UNDERLAY_MTU} {where})" in text.splitlines(), text


def test_a_df_ping_of_the_mtu_crosses_and_one_byte_more_is_too_long(auto_lab: tuple[Lab, int, bool]) -> None:
    lab, version, _ = auto_lab
    mtu = mtus.derive(UNDERLAY_MTU, version).mtu
    lab.wait_established()
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        res = lab.ping(src, dst.overlay4, count=3, size=mtu - 28, df=True)
        assert " 0% packet loss" in res.stdout and f"{mtu - 20} bytes from" in res.stdout, res.stdout
        res = lab.ping(src, dst.overlay4, count=1, size=mtu - 28 + 1, df=True, check=False)
        out = (res.stdout + res.stderr).lower()
        assert res.returncode != 0 and "message too long" in out and f"mtu={mtu}" in out, out
    for host in lab.hosts.values():
        assert lab.network(host)["drops"].get("tun_oversize", 0) == 0  # refused before the tunnel
