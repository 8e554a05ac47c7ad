"""``mtu = "auto"`` against a fixed end: two real workers on loopback agree on the smaller MTU.

The auto end runs with what a 1500-byte IPv4 underlay gives (`controller.mtu.derive`: mtu 1412,
max_datagram_size 1472); the other end with the defaults (1280, 1350) or auto as well.
"""

from __future__ import annotations

import asyncio

import pytest

from l3ptp.controller import mtu as mtus
from l3ptp.ipc.control_messages import Engine
from l3ptp.ipc.counters import DropReason
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import ENGINE_PAIRS, worker_pair

pytestmark = pytest.mark.timeout(60)

AUTO = mtus.derive(1500, 4)
AUTO_KW = {"mtu": AUTO.mtu, "max_datagram_size": AUTO.max_datagram_size}
FIXED_KW = {"mtu": 1280, "max_datagram_size": 1350}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


def _packet(size: int, src: str = "198.19.0.2", dst: str = "198.19.0.1") -> bytes:
    p = ipv4_udp(src, dst, b"m" * (size - 28), df=True)
    assert len(p) == size
    return p


@pytest.mark.parametrize(("listener_auto", "connector_auto"), [(True, False), (False, True)],
                         ids=["auto-listener", "auto-connector"])
@pytest.mark.parametrize(("lengine", "cengine"), ENGINE_PAIRS)
def test_an_auto_end_and_a_1280_end_run_at_1280(listener_auto: bool, connector_auto: bool,
                                                  lengine: Engine, cengine: Engine) -> None:
    async def main():
        lkw = {"engine": lengine, **(AUTO_KW if listener_auto else FIXED_KW)}
        ckw = {"engine": cengine, **(AUTO_KW if connector_auto else FIXED_KW)}
        async with worker_pair(listener_kw=lkw, connector_kw=ckw) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            assert lt.datapath.mtu == ct.datapath.mtu == 1280
            # 1280 passes both ways; the auto end's larger packets are refused at its own TUN
            # (ICMP "fragmentation needed" goes back, docs/protocol.md), never sent to the peer.
            pair.connector.tun.inject(_packet(1280))
            assert await pair.listener.tun.async_wait_packets(1, 5) == [_packet(1280)]
            pair.listener.tun.inject(_packet(1280, "198.19.0.1", "198.19.0.2"))
            assert await pair.connector.tun.async_wait_packets(1, 5) == [_packet(1280, "198.19.0.1", "198.19.0.2")]
            auto_node = pair.listener if listener_auto else pair.connector
            src, dst = ("198.19.0.1", "198.19.0.2") if listener_auto else ("198.19.0.2", "198.19.0.1")
            auto_node.tun.inject(_packet(1281, src, dst))
            replies = await auto_node.tun.async_wait_packets(1, 5)
            assert replies[0][9] == 1 and replies[0][20:22] == bytes([3, 4])  # ICMPv4 type 3 code 4
            assert int.from_bytes(replies[0][26:28], "big") == 1280  # next-hop MTU
            assert auto_node.tunnel.counters.drops[DropReason.TUN_OVERSIZE] == 1
            fixed_node = pair.connector if listener_auto else pair.listener
            assert fixed_node.tunnel.counters.total_drops() == 0

    run(main())


@pytest.mark.parametrize(("lengine", "cengine"), ENGINE_PAIRS)
def test_two_auto_ends_run_at_the_derived_mtu(lengine: Engine, cengine: Engine) -> None:
    async def main():
        async with worker_pair(listener_kw={"engine": lengine, **AUTO_KW},
                               connector_kw={"engine": cengine, **AUTO_KW}) as pair:
            assert await pair.wait_established()
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            assert lt.datapath.mtu == ct.datapath.mtu == AUTO.mtu == 1412
            pair.connector.tun.inject(_packet(AUTO.mtu))
            assert await pair.listener.tun.async_wait_packets(1, 5) == [_packet(AUTO.mtu)]
            pair.listener.tun.inject(_packet(AUTO.mtu, "198.19.0.1", "198.19.0.2"))
            assert await pair.connector.tun.async_wait_packets(1, 5) == [_packet(AUTO.mtu, "198.19.0.1", "198.19.0.2")]
            assert lt.counters.total_drops() == 0 and ct.counters.total_drops() == 0

    run(main())
