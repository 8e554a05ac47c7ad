"""TUN offloads between two real workers on loopback (fake TUNs in each `TunMode`): a super-packet read on one
end arrives as its segments, coalesced again where the other end has offloads and one by one where it has none.
No negotiation: the DATAGRAMs on the wire are the same either way (docs/worker.md, "TUN offloads")."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.worker import vnet
from l3ptp.worker.tun_io import PLAIN, TunMode
from tests.support.fake_tun import FakeTun
from tests.support.worker_fixtures import ENGINES, worker_pair
from tests.unit.test_worker_offload import segments, super_packet

pytestmark = pytest.mark.timeout(60)

OFFLOAD = TunMode(True, True, "test")
FALLBACK = TunMode(True, False, "test: TUNSETOFFLOAD refused")


async def received(tun: FakeTun, count: int, vnet_hdr: bool, timeout: float = 10.0) -> list[bytes]:
    """The IP packets the worker wrote to `tun` (split again where it wrote super-packets), once `count` came."""
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < count and loop.time() < deadline:
        for raw in tun.read_all():
            got += vnet.split(raw) if vnet_hdr else [raw]
        await asyncio.sleep(0.01)
    return got


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
            assert await received(pair.connector.tun, len(expected), receiver.vnet) == expected
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


def test_a_device_refusing_offloads_falls_back_with_the_reason_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe on an IFF_VNET_HDR device whose kernel refuses TUNSETOFFLOAD: the worker runs with plain
    virtio_net_hdr reads and writes (nothing split or coalesced), and says why in its `tun_mode` line."""
    from structlog.testing import capture_logs

    from l3ptp.worker import tun_io
    from tests.unit.test_worker_tun_io import fake_ioctl

    ioctl, _ = fake_ioctl(0x5101, errno.EOPNOTSUPP)
    mode = tun_io.probe(3, ioctl)

    async def main() -> None:
        with capture_logs() as logs:
            async with worker_pair(listener_tunnel_kw={"tun_mode": mode},
                                   connector_tunnel_kw={"tun_mode": OFFLOAD}) as pair:
                assert await pair.wait_established()
                data = os.urandom(3000)
                packets = [vnet.PLAIN_HEADER + p for p in segments(6, data, 1000, seq=1)]
                for p in packets:  # the listener (fallback) reads plain-header packets
                    pair.listener.tun.inject(p)
                assert await received(pair.connector.tun, len(packets), True) == segments(6, data, 1000, seq=1)
                assert pair.listener.tunnel.tun.gso_split == 0
        lines = [e for e in logs if e["event"] == "tun_mode"]
        assert {(e["vnet"], e["offload"]) for e in lines} == {(True, False), (True, True)}
        assert any("TUNSETOFFLOAD refused" in e["reason"] and "not supported" in e["reason"] for e in lines)

    asyncio.run(asyncio.wait_for(main(), 45))
