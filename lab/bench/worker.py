"""Per-packet CPU cost of a worker pair on loopback (not a test; run by hand).

    .venv/bin/python -m lab.bench.worker [--packets N] [--rounds R] [--pacers aioquic,burst]

Two `Tunnel`s (listener + connector) run in ONE process and event loop over
127.0.0.1 with fake TUNs; the connector's host side injects N full-size
(1280-byte) IPv4 packets, keeping at most WINDOW of them unreceived, and the
listener's host side reads them. Reported: CPU microseconds (process time,
both workers + the fake-TUN host side) per delivered packet and the
delivered packets per wall second, for each engine with and without UDP
GSO/GRO. Results vary with the machine; compare ratios within one run.
Nothing here asserts a speed.

``--pacers`` compares pacers of the aioquic engine instead (issue 16 item 6),
in interleaved rounds, with GSO/GRO on: ``aioquic`` is aioquic's own
`QuicPacketPacer`, ``burst`` the engine's `BurstPacer`, ``burst:N`` that pacer
with at most N packets per burst. Also reported: timer wake-ups of both
tunnels per 1,000 delivered packets.
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


def _pacer_class(name: str) -> Any:
    if name == "aioquic":
        from aioquic.quic.recovery import QuicPacketPacer

        return QuicPacketPacer
    from l3ptp.worker.engine_aioquic import burst_pacer_class

    cls = burst_pacer_class()
    if ":" in name:
        cls = type("BurstPacerVariant", (cls,), {"max_burst": int(name.split(":", 1)[1])})
    return cls


def _use(tunnel: Any, pacer: str, timers: list[int]) -> None:
    """Put pacer `pacer` on `tunnel`'s connection and count its timer wake-ups in `timers`."""
    conn = tunnel.active.conn
    conn._loss._pacer = _pacer_class(pacer)(max_datagram_size=conn._max_datagram_size)
    inner = tunnel._on_timer

    def counted() -> None:
        timers[0] += 1
        inner()

    tunnel._on_timer = counted  # read when the next timer is armed


async def _one(engine: Engine, gso: bool, packets: int, pacer: str | None = None) -> tuple[float, float, int, int]:
    kw: dict[str, Any] = {"gso": gso, "gro": gso}
    timers = [0]
    async with worker_pair(engine=engine, tunnel_kw=kw) as pair:
        if not await pair.wait_established():
            raise RuntimeError("no session")
        if pacer is not None:
            for node in (pair.connector, pair.listener):
                _use(node.tunnel, pacer, timers)
        tx, rx = pair.connector.tun, pair.listener.tun
        payload = ipv4_udp("198.19.0.2", "198.19.0.1", b"x" * (1280 - 28))
        # warm-up
        for _ in range(64):
            tx.inject(payload)
        await rx.async_wait_packets(64, 5)
        timers[0] = 0
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
        return cpu / max(got, 1) * 1e6, got / wall, sent - got, timers[0] * 1000 // max(got, 1)


def _pacers(names: list[str], packets: int, rounds: int) -> None:
    runs: dict[str, list[tuple[float, float, int, int]]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            runs[name].append(asyncio.run(_one(Engine.AIOQUIC, True, packets, name)))
    base = names[0]
    print(f"{'pacer':10} {'us/pkt [spread]':>22} {'pkt/s [spread]':>24} {'pkt/s vs ' + base:>16} timers/1000 lost")
    for name in names:
        us, pps = [r[0] for r in runs[name]], [r[1] for r in runs[name]]
        ratio = [r[1] / b[1] for r, b in zip(runs[name], runs[base])]
        print(f"{name:10} {statistics.median(us):7.1f} [{min(us):.1f}-{max(us):.1f}] "
              f"{statistics.median(pps):8.0f} [{min(pps):.0f}-{max(pps):.0f}] "
              f"{statistics.median(ratio):6.2f}x [{min(ratio):.2f}-{max(ratio):.2f}] "
              f"{statistics.median(r[3] for r in runs[name]):5.0f} {sum(r[2] for r in runs[name])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pacers", help="compare these aioquic pacers (aioquic, burst, burst:N) instead")
    args = ap.parse_args()
    if args.pacers:
        _pacers(args.pacers.split(","), args.packets, args.rounds)
        return
    rows = []
    for engine in (Engine.AIOQUIC, Engine.QH3):
        if not engine_available(engine):
            continue
        for gso in (False, True):
            us, pps, lost = [], [], 0
            for _ in range(args.rounds):
                u, p, lo, _ = asyncio.run(_one(engine, gso, args.packets))
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
