"""Datapath: every drop counted under its own reason; nothing oversized queued."""

from __future__ import annotations

from l3ptp.ipc.constants import HEADER_LEN
from l3ptp.ipc.counters import DropReason
from l3ptp.worker.datapath import Datapath
from l3ptp.worker.header import encode_datagram, pack_header
from tests.support.packets import ipv4_udp, ipv6_udp

RX_CTX = 7
TX_CTX = 9


def _dp(queue_max: int = 256) -> Datapath:
    dp = Datapath(
        local_sources=("198.19.0.1/32", "fd00::1/128"),
        peer_sources=("198.19.0.2/32", "fd00::2/128"),
        queue_max=queue_max,
    )
    dp.start_session(mtu=1280, max_payload=1318, tx_context_id=TX_CTX, rx_context_id=RX_CTX)
    return dp


def _only(dp: Datapath, reason: DropReason, n: int = 1) -> None:
    nonzero = {k: v for k, v in dp.counters.drops.items() if v}
    assert nonzero == {reason: n}


def test_not_ready_drops_both_ways() -> None:
    dp = Datapath(local_sources=(), peer_sources=())
    assert dp.from_tun_batch([ipv4_udp("198.19.0.1", "198.19.0.2", b"x")], 0) == []
    assert dp.from_peer(b"\0" * 40) is None
    assert dp.counters.drops[DropReason.TUN_NOT_READY] == 1
    assert dp.counters.drops[DropReason.DGRAM_NOT_READY] == 1


def test_tun_to_peer_frames_and_sequences() -> None:
    dp = _dp()
    p4 = ipv4_udp("198.19.0.1", "198.19.0.2", b"a")
    p6 = ipv6_udp("fd00::1", "fd00::2", b"b")
    out = dp.from_tun_batch([p4, p6], 0)
    assert out == [encode_datagram(TX_CTX, 0, p4), encode_datagram(TX_CTX, 1, p6)]
    assert dp.counters.tun_rx_packets == 2 and dp.counters.total_drops() == 0


def test_tun_drops_by_reason() -> None:
    cases = [
        (b"", DropReason.TUN_BAD_PACKET),
        (b"\x50" + b"\0" * 30, DropReason.TUN_BAD_IP_VERSION),
        (ipv4_udp("198.19.0.3", "198.19.0.2", b"x"), DropReason.TUN_SRC_NOT_ALLOWED),
        (ipv4_udp("198.19.0.1", "198.19.0.2", b"x" * 1300, df=True), DropReason.TUN_OVERSIZE),
        (ipv6_udp("fd00::1", "fd00::2", b"x" * 1300), DropReason.TUN_OVERSIZE),
    ]
    for packet, reason in cases:
        dp = _dp()
        assert dp.from_tun_batch([packet], 0) == []
        _only(dp, reason)


def test_budget_smaller_than_mtu_is_oversize_never_queued() -> None:
    dp = _dp()
    dp.set_budget(1000 + HEADER_LEN)  # live DATAGRAM budget below the MTU
    big = ipv4_udp("198.19.0.1", "198.19.0.2", b"x" * 1000, df=True)
    small = ipv4_udp("198.19.0.1", "198.19.0.2", b"y")
    out = dp.from_tun_batch([big, small], 0)
    assert out == [encode_datagram(TX_CTX, 0, small)]
    _only(dp, DropReason.TUN_OVERSIZE)


def test_queue_full_counts() -> None:
    dp = _dp(queue_max=4)
    packets = [ipv4_udp("198.19.0.1", "198.19.0.2", bytes([i])) for i in range(5)]
    assert len(dp.from_tun_batch(packets, 2)) == 2
    _only(dp, DropReason.QUEUE_FULL, 3)


def test_peer_to_tun_accepts_and_drops_by_reason() -> None:
    good = ipv4_udp("198.19.0.2", "198.19.0.1", b"hi")
    dp = _dp()
    assert bytes(dp.from_peer(encode_datagram(RX_CTX, 5, good))) == good
    assert dp.counters.total_drops() == 0
    spoofed = ipv4_udp("198.19.0.9", "198.19.0.1", b"hi")
    wrong_version = pack_header(RX_CTX, 1, 6, len(good)) + good
    cases = [
        (b"garbage", DropReason.DGRAM_BAD_HEADER),
        (b"\x03\x01" + b"\xff" * 30, DropReason.DGRAM_BAD_HEADER),
        (encode_datagram(RX_CTX + 1, 1, good), DropReason.DGRAM_UNKNOWN_CONTEXT),
        (encode_datagram(RX_CTX, 1, spoofed), DropReason.DGRAM_SRC_NOT_ALLOWED),
        (wrong_version, DropReason.DGRAM_BAD_IP_VERSION),
        (encode_datagram(RX_CTX, 1, good[:-1]), DropReason.DGRAM_BAD_IP),
        (encode_datagram(RX_CTX, 1, ipv6_udp("fd00::2", "fd00::1", b"z" * 1300)), DropReason.DGRAM_OVERSIZE),
    ]
    for payload, reason in cases:
        dp = _dp()
        assert dp.from_peer(payload) is None, reason
        _only(dp, reason)
        assert dp.counters.dgram_rx_packets == 1


def test_sequence_loss_estimate() -> None:
    dp = _dp()
    good = ipv4_udp("198.19.0.2", "198.19.0.1", b"hi")
    for seq in (0, 1, 4):
        dp.from_peer(encode_datagram(RX_CTX, seq, good))
    assert dp.counters.seq_lost == 2


def test_no_silent_drop_in_datapath_source() -> None:
    """Every `continue`/`return None` in the data path follows a counter bump."""
    import inspect

    from l3ptp.worker import datapath

    lines = inspect.getsource(datapath).splitlines()
    for i, line in enumerate(lines):
        if line.strip() in ("continue", "return None"):
            assert "drops[" in lines[i - 1] or "drop(" in lines[i - 1], (i, line)


def test_a_renewed_session_still_accepts_the_replaced_ones_context_until_it_retires() -> None:
    good = ipv4_udp("198.19.0.2", "198.19.0.1", b"hi")
    dp = _dp()
    dp.start_session(mtu=1280, max_payload=1318, tx_context_id=TX_CTX + 1, rx_context_id=RX_CTX + 1,
                     keep_previous=True)
    assert dp.from_peer(encode_datagram(RX_CTX + 1, 1, good)) is not None
    assert dp.from_peer(encode_datagram(RX_CTX, 2, good)) is not None  # in flight on the replaced one
    dp.rx_previous = -1  # it retired
    assert dp.from_peer(encode_datagram(RX_CTX, 3, good)) is None
    _only(dp, DropReason.DGRAM_UNKNOWN_CONTEXT)
    # A session that replaces none (a reconnect) keeps nothing of the one before.
    dp.stop_session()
    dp.start_session(mtu=1280, max_payload=1318, tx_context_id=1, rx_context_id=2, keep_previous=True)
    assert dp.rx_previous == -1
