"""``mtu = "auto"`` through a real Controller (fake helper, fake spawner): what the helper and the workers get.

No root: the path MTU comes from the host's own loopback route (a peer on 127.0.0.2), and a
bind to an address the host does not have (198.18.255.1) makes the probe fail, which falls back.
"""

from __future__ import annotations

import ipaddress
import json

from l3ptp.controller import mtu as mtus
from l3ptp.controller.pathmtu import route_mtu
from l3ptp.ipc.helper_messages import CreateNetwork
from tests.integration.test_controller_app import run, running
from tests.support.config_builders import lab, office


def test_auto_networks_are_created_and_run_with_the_derived_mtu_or_the_fallback() -> None:
    path = route_mtu(ipaddress.ip_address("127.0.0.2"), 4433, ipaddress.ip_address("127.0.0.1"))
    derived = mtus.derive(path, 4)
    networks = {
        "office": office(mtu="auto", underlay={"local": "127.0.0.1", "peer": "127.0.0.2", "port": 4433}),
        "lab": lab(mtu="auto", underlay={"local": "198.18.255.1", "peer": "198.18.255.2", "port": 5533}),
    }

    async def body() -> None:
        async with running(networks) as env:
            created = {r.name: r.mtu for r in env.helper.requests if isinstance(r, CreateNetwork)}
            assert created == {"office": derived.mtu, "lab": 1280}
            by_net = {p.network: p.config for p in env.spawner.live("office") + env.spawner.live("lab")}
            assert (by_net["office"].mtu, by_net["office"].max_datagram_size) == (derived.mtu,
                                                                                  derived.max_datagram_size)
            assert (by_net["lab"].mtu, by_net["lab"].max_datagram_size) == (1280, 1350)
            rc, out, err = await env.cli("status", "--json")
            assert rc == 0, err
            nets = {n["name"]: n for n in json.loads(out)["networks"]}
            assert (nets["office"]["interface_mtu"], nets["office"]["mtu_source"]) == (derived.mtu, "auto")
            assert nets["office"]["mtu_note"] == f"path MTU {path} toward 127.0.0.2"
            assert (nets["lab"]["interface_mtu"], nets["lab"]["mtu_source"]) == (1280, "auto-fallback")
            assert nets["lab"]["mtu_note"] == ("no path MTU toward 198.18.255.2 (Cannot assign requested address):"
                                               " fell back to the default")
            rc, out, _ = await env.cli("status")
            assert f"  mtu: {derived.mtu} (auto: path MTU {path} toward 127.0.0.2)" in out.splitlines(), out

    run(body)
