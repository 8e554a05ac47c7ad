"""`python -m lab.hops`: pairing a ping's packets across two hosts' captures into hops (pure)."""

from __future__ import annotations

import pytest

from lab.hops import HOPS, Row, hops_of, parse_rows, render

TUN, UNDER = "l3p-demo", "under0"


def icmp(kind: int, seq: int) -> bytes:
    """The first 28 bytes of an IPv4 ICMP echo (kind 8) or reply (0) with sequence `seq`."""
    return bytes([0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0]) + bytes(8) + bytes([kind, 0, 0, 0, 0, 1]) + seq.to_bytes(2, "big")


UDP = bytes([0x45, 0, 0, 158, 0, 0, 0x40, 0, 64, 17]) + bytes(18)


def trip(seq: int, t0: int, noise: bool = True) -> tuple[list[Row], list[Row]]:
    """One echo's packets as seen on A and B, hops 100, 5, 200, 20, 50, 6, 70 us after `t0` (ns)."""
    us = 1000
    a = [Row(t0, TUN, True, 84, icmp(8, seq))]
    if noise:  # an ACK-only packet leaves first: too small to be the echo's datagram
        a.append(Row(t0 + 50 * us, UNDER, True, 61, UDP))
    a += [Row(t0 + 100 * us, UNDER, True, 158, UDP)]
    b = [Row(t0 + 105 * us, UNDER, False, 158, UDP), Row(t0 + 305 * us, TUN, False, 84, icmp(8, seq)),
         Row(t0 + 325 * us, TUN, True, 84, icmp(0, seq)), Row(t0 + 375 * us, UNDER, True, 158, UDP)]
    a += [Row(t0 + 381 * us, UNDER, False, 158, UDP), Row(t0 + 451 * us, TUN, False, 84, icmp(0, seq))]
    return a, b


def test_each_hop_is_the_time_between_the_packets_that_carry_one_echo() -> None:
    a1, b1 = trip(1, 10**9)
    a2, b2 = trip(2, 2 * 10**9, noise=False)
    samples = hops_of(a1 + a2, b1 + b2, TUN, UNDER)
    assert len(samples) == 2
    expected = dict(zip(HOPS, (100.0, 5.0, 200.0, 20.0, 50.0, 6.0, 70.0, 451.0)))
    assert samples[0] == expected and samples[1] == expected


def test_an_echo_without_its_reply_or_with_the_legs_out_of_order_is_left_out() -> None:
    a, b = trip(1, 10**9)
    lost_reply = [r for r in a if not (r.ifname == TUN and not r.out)]
    assert hops_of(lost_reply, b, TUN, UNDER) == []
    # B's copy of the datagram stamped after the echo it carries entered B's kernel: not one trip, left out.
    late = [r._replace(ts=r.ts + 10**6) if r.ifname == UNDER and not r.out else r for r in b]
    assert hops_of(a, late, TUN, UNDER) == []


def test_rows_round_trip_through_the_capture_format_and_render() -> None:
    a, b = trip(7, 5 * 10**9)
    text = "\n".join(f"{r.ts} {r.ifname} {int(r.out)} {r.length} {r.head.hex()}" for r in a)
    assert parse_rows(text) == a
    table = render({"x": [(0.5, hops_of(a, b, TUN, UNDER) * 3)]})
    assert "| 1 A tun->udp | 100 [100-100] |" in table
    assert "3; 0.500" in table


@pytest.mark.parametrize("other", ["eth9", TUN])
def test_datagrams_on_another_interface_or_direction_do_not_count(other: str) -> None:
    a, b = trip(1, 10**9)
    moved = [r._replace(ifname=other, out=False) if r.ifname == UNDER and r.out else r for r in a]
    assert hops_of(moved, b, TUN, UNDER) == []
