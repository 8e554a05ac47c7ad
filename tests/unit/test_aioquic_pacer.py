"""The aioquic engine's pacer (issue 16 item 6): bursts of ~2 ms instead of a wake-up every few packets.

Both pacers are driven on a virtual clock by the loop aioquic's sender runs: ask `next_send_time`,
send one packet (`update_after_send`) when it says None, else wait until the time it names.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("aioquic")

from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.recovery import QuicPacketPacer  # noqa: E402

from l3ptp.ipc.constants import ALPN  # noqa: E402
from l3ptp.ipc.control_messages import Engine  # noqa: E402
from l3ptp.worker.engine import load_engine  # noqa: E402
from l3ptp.worker.engine_aioquic import burst_pacer_class  # noqa: E402

MDS = 1280


def drive(pacer: Any, packets: int, start: float = 1000.0) -> tuple[int, float, list[int]]:
    """Send `packets` as fast as `pacer` allows: (wake-ups, seconds taken, packets per burst)."""
    now, waits, bursts, burst = start, 0, [], 0
    sent = 0
    while sent < packets:
        at = pacer.next_send_time(now=now)
        if at is None:
            pacer.update_after_send(now=now)
            sent += 1
            burst += 1
            continue
        waits += 1
        bursts.append(burst)
        burst = 0
        assert at > now
        now = at
    bursts.append(burst)
    return waits, now - start, bursts


def test_aioquic_connections_use_the_burst_pacer() -> None:
    engine = load_engine(Engine.AIOQUIC)
    conn = engine.QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN]))
    assert isinstance(conn._loss._pacer, burst_pacer_class())
    assert isinstance(conn._loss._pacer, QuicPacketPacer)  # the recovery code still drives it the same way


def test_on_a_fast_path_the_burst_pacer_wakes_a_tenth_as_often_at_the_same_rate() -> None:
    # 1 MB window over a 1 ms RTT: 1 GB/s, a packet every 1.28 us.
    results = {}
    for cls in (QuicPacketPacer, burst_pacer_class()):
        pacer = cls(max_datagram_size=MDS)
        pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.001)
        results[cls] = drive(pacer, 20_000)
    (a_waits, a_time, _), (b_waits, b_time, _) = results.values()
    assert a_waits >= 10 * b_waits  # aioquic: a wake-up per packet once its 16 are gone; burst: per 32
    floor = 20_000 * MDS / 1e9
    assert floor * 0.9 <= b_time <= a_time * 1.1  # still paced at the window's rate, and no slower


def test_on_a_long_path_bursts_stay_small() -> None:
    # 100 kB window over 50 ms: 2 MB/s; 2 ms of that is 3 packets, so the 10-packet floor rules.
    pacer = burst_pacer_class()(max_datagram_size=MDS)
    pacer.update_rate(congestion_window=100_000, smoothed_rtt=0.05)
    waits, took, bursts = drive(pacer, 200)
    assert max(bursts) <= 11
    assert took >= 200 * MDS / 2e6 * 0.9  # the window's rate holds
