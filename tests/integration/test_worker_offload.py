"""TUN offloads between two real workers on loopback (fake TUNs in each `TunMode`): a super-packet read on one
end arrives as its segments, coalesced again where the other end has offloads and one by one where it has none.
No negotiation: the DATAGRAMs on the wire are the same either way (docs/worker.md, "TUN offloads")."""

from __future__ import annotations

import asyncio
import os

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.worker import vnet
from l3ptp.worker.tun_io import PLAIN, TunMode
from tests.support.worker_fixtures import ENGINES, worker_pair
from tests.unit.test_worker_offload import segments, super_packet

pytestmark = pytest.mark.timeout(60)

OFFLOAD = TunMode(True, True, "test")
FALLBACK = TunMode(True, False, "test: TUNSETOFFLOAD refused")


@pytest.mark.parametrize("receiver", [OFFLOAD, FALLBACK, PLAIN], ids=["offload", "fallback", "plain"])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("engine", ENGINES)
def test_super_packet_crosses_as_segments(engine: Engine, version: int, receiver: TunMode) -> None:
    """The listener (offload on) reads a 20 KB super-packet: 17 DATAGRAMs; the connector writes them coalesced
    (offload), each behind a plain virtio_net_hdr (fallback) or as they are (a plain TUN)."""
    async def main() -> None:
        async with worker_pair(engine=engine, listener_tunnel_kw={"tun_mode": OFFLOAD},
                               connector_tunnel_kw={"tun_mode": receiver}) as pair:
            assert await pair.wait_established()
            data = os.urandom(20000)
            expected = segments(version, data, 1200, seq=7, flags=0x18)
            pair.listener.tun.inject(super_packet(version, data, 1200, seq=7, flags=0x18))
            got: list[bytes] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while len(got) < len(expected) and loop.time() < deadline:
                for raw in pair.connector.tun.read_all():
                    got += vnet.split(raw) if receiver.vnet else [raw]
                await asyncio.sleep(0.01)
            assert got == expected
            lt, ct = pair.listener.tunnel, pair.connector.tunnel
            assert lt.tun.gso_split == 1 and lt.tun.gso_segments == len(expected)
            assert lt.counters.dgram_tx_packets == len(expected) and lt.counters.total_drops() == 0
            assert ct.counters.tun_tx_packets == len(expected) and ct.counters.total_drops() == 0
            if receiver.offload:
                # What one UDP wake-up received is merged (the 17 leave in one burst; the last of a wake-up may
                # be alone).
                assert len(expected) >= ct.tun.gro_merged > ct.tun.gro_writes >= 1
            else:
                assert ct.tun.gro_writes == 0

    asyncio.run(asyncio.wait_for(main(), 45))
