"""Per-packet CPU cost of a worker pair on loopback (not a test; run by hand).

    .venv/bin/python -m lab.bench.worker [--packets N] [--rounds R]

Two `Tunnel`s (listener + connector) run in ONE process and event loop over
127.0.0.1 with fake TUNs; the connector's host side injects N full-size
(1280-byte) IPv4 packets, keeping at most WINDOW of them unreceived, and the
listener's host side reads them. Reported: CPU microseconds (process time,
both workers + the fake-TUN host side) per delivered packet and the
delivered packets per wall second, for each engine with and without UDP
GSO/GRO. Results vary with the machine; compare ratios within one run.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from l3ptp.ipc.control_messages import Engine
from tests.support.packets import ipv4_udp
from tests.support.worker_fixtures import engine_available, worker_pair

WINDOW = 256


async def _one(engine: Engine, gso: bool, packets: int, old_tunnel: Any = None) -> tuple[float, float, int]:
    kw: dict[str, Any] = {"gso": gso, "gro": gso}
    async with worker_pair(engine=engine, tunnel_kw=kw) as pair:
        if not await pair.wait_established():
            raise RuntimeError("no session")
        tx, rx = pair.connector.tun, pair.listener.tun
        payload = ipv4_udp("198.19.0.2", "198.19.0.1", b"x" * (1280 - 28))
        # warm-up
        for _ in range(64):
            tx.inject(payload)
        await rx.async_wait_packets(64, 5)
        sent = got = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        cpu0, wall0 = time.process_time(), time.perf_counter()
        cpu, wall = cpu0, wall0
        last_rx = loop.time()
        # DATAGRAMs lost on the way are not retransmitted: stop 0.5 s after
        # the last arrival once everything is sent.
        while got < packets and loop.time() < deadline and not (sent == packets and loop.time() - last_rx > 0.5):
            while sent < packets and sent - got < WINDOW:
                try:
                    tx.inject(payload)
                except BlockingIOError:
                    break
                sent += 1
            n = len(rx.read_all())
            if n:
                got += n
                last_rx = loop.time()
                cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.sleep(0)
        cpu, wall = cpu - cpu0, wall - wall0
        return cpu / max(got, 1) * 1e6, got / wall, sent - got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for engine in (Engine.AIOQUIC, Engine.QH3):
        if not engine_available(engine):
            continue
        for gso in (False, True):
            us, pps, lost = [], [], 0
            for _ in range(args.rounds):
                u, p, lo = asyncio.run(_one(engine, gso, args.packets))
                us.append(u)
                pps.append(p)
                lost += lo
            rows.append((engine.value, gso, statistics.median(us), statistics.median(pps), lost))
    base = rows[0][2]
    print(f"{'engine':8} {'gso/gro':7} {'us/pkt':>7} {'pkt/s':>8} {'vs aioquic':>10} lost")
    for name, gso, us, pps, lost in rows:
        print(f"{name:8} {str(gso):7} {us:7.1f} {pps:8.0f} {base / us:9.2f}x {lost}")


if __name__ == "__main__":
    main()
