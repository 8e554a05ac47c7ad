"""Unit tests for l3ptp.ipc.counters."""

from __future__ import annotations

import pytest

from l3ptp.ipc.counters import TRAFFIC_FIELDS, Counters, DropReason, SequenceTracker

REQUIRED_REASONS = {
    "tun_bad_packet",
    "tun_bad_ip_version",
    "tun_src_not_allowed",
    "tun_oversize",
    "tun_not_ready",
    "queue_full",
    "dgram_send_error",
    "dgram_bad_header",
    "dgram_bad_ip_version",
    "dgram_bad_ip",
    "dgram_unknown_context",
    "dgram_src_not_allowed",
    "dgram_oversize",
    "dgram_not_ready",
    "tun_write_eagain",
    "tun_write_error",
}
WRAP = 1 << 32


# -- DropReason ----------------------------------------------------------------


def test_drop_reason_has_every_required_reason() -> None:
    assert REQUIRED_REASONS <= {r.value for r in DropReason}


@pytest.mark.parametrize("reason", list(DropReason))
def test_drop_reason_value_is_lower_case_name(reason: DropReason) -> None:
    assert reason.value == reason.name.lower()
    assert str(reason) == reason.value
    assert DropReason(reason.value) is reason


@pytest.mark.parametrize("reason", list(DropReason))
def test_drop_reason_named_where_why(reason: DropReason) -> None:
    where, _, why = reason.value.partition("_")
    assert where in {"tun", "dgram", "queue", "initial"}
    assert why


# -- Counters ------------------------------------------------------------------


def test_counters_start_at_zero() -> None:
    c = Counters()
    assert c.snapshot() == dict.fromkeys(TRAFFIC_FIELDS, 0)
    assert c.drops == dict.fromkeys(DropReason, 0)
    assert c.total_drops() == 0
    assert c.seq_lost == 0


def test_counters_use_slots() -> None:
    c = Counters()
    assert not hasattr(c, "__dict__")
    with pytest.raises(AttributeError):
        c.tun_rx_packts = 1  # type: ignore[attr-defined]  # a typo must not create a counter


def test_counters_snapshot_reports_every_traffic_counter_by_name() -> None:
    c = Counters()
    for i, name in enumerate(TRAFFIC_FIELDS, start=1):
        setattr(c, name, getattr(c, name) + i)
    snap = c.snapshot()
    assert list(snap) == list(TRAFFIC_FIELDS)
    assert snap == {name: i for i, name in enumerate(TRAFFIC_FIELDS, start=1)}
    assert set(TRAFFIC_FIELDS) == {
        f"{where}_{way}_{what}" for where in ("tun", "dgram") for way in ("rx", "tx") for what in ("packets", "bytes")
    } | {"unauth_rx_packets", "unauth_rx_bytes"}


def test_counters_snapshot_is_a_copy() -> None:
    c = Counters()
    snap = c.snapshot()
    drops = c.drops_snapshot()
    c.tun_rx_packets += 1
    c.drop(DropReason.QUEUE_FULL)
    assert snap["tun_rx_packets"] == 0
    assert drops["queue_full"] == 0


def test_counters_drop_and_total() -> None:
    c = Counters()
    c.drop(DropReason.TUN_OVERSIZE)
    c.drop(DropReason.TUN_OVERSIZE)
    c.drop(DropReason.DGRAM_BAD_HEADER, 5)
    assert c.drops[DropReason.TUN_OVERSIZE] == 2
    assert c.drops[DropReason.DGRAM_BAD_HEADER] == 5
    assert c.total_drops() == 7


def test_counters_drops_snapshot_has_every_reason_as_string_including_zeros() -> None:
    c = Counters()
    c.drop(DropReason.DGRAM_SRC_NOT_ALLOWED, 3)
    snap = c.drops_snapshot()
    assert set(snap) == {r.value for r in DropReason}
    assert all(type(k) is str for k in snap)
    assert snap["dgram_src_not_allowed"] == 3
    assert sum(snap.values()) == 3
    assert snap["tun_write_eagain"] == 0


def test_counters_seq_lost_follows_rx_sequence() -> None:
    c = Counters()
    for seq in (1, 2, 5):
        c.rx_sequence.observe(seq)
    assert c.seq_lost == 2
    c.rx_sequence.reset()
    assert c.seq_lost == 0


def test_counters_repr_mentions_drops() -> None:
    c = Counters()
    c.drop(DropReason.QUEUE_FULL)
    assert "drops=1" in repr(c)


# -- SequenceTracker -----------------------------------------------------------


def observe_all(seqs: list[int]) -> SequenceTracker:
    tracker = SequenceTracker()
    for seq in seqs:
        tracker.observe(seq)
    return tracker


def test_sequence_empty() -> None:
    t = SequenceTracker()
    assert (t.received, t.expected, t.lost) == (0, 0, 0)


def test_sequence_single_packet() -> None:
    t = observe_all([12345])
    assert (t.received, t.expected, t.lost) == (1, 1, 0)


def test_sequence_in_order_no_loss() -> None:
    t = observe_all(list(range(100, 200)))
    assert (t.received, t.expected, t.lost) == (100, 100, 0)


def test_sequence_gaps_are_lost() -> None:
    t = observe_all([0, 1, 2, 5, 6, 10])  # missing 3, 4, 7, 8, 9
    assert t.expected == 11
    assert t.lost == 5


def test_sequence_wraps_around() -> None:
    t = observe_all([WRAP - 3, WRAP - 2, WRAP - 1, 0, 1, 2])
    assert (t.expected, t.lost) == (6, 0)


def test_sequence_gap_across_wrap() -> None:
    t = observe_all([WRAP - 2, 1])  # missing 2**32-1 and 0
    assert (t.expected, t.lost) == (4, 2)


def test_sequence_many_wraps() -> None:
    t = SequenceTracker()
    seq = WRAP - 10
    for _ in range(3):
        for _ in range(WRAP // (1 << 30)):
            t.observe(seq % WRAP)
            seq += 1 << 30  # big but < 2**31 steps, each losing 2**30 - 1
    assert t.received == 12
    assert t.expected == 11 * (1 << 30) + 1
    assert t.lost == t.expected - 12


def test_sequence_reordering_is_not_loss_once_late_packet_arrives() -> None:
    t = observe_all([1, 2, 4, 5])
    assert t.lost == 1
    t.observe(3)
    assert (t.expected, t.lost) == (5, 0)


def test_sequence_packet_older_than_first_extends_span() -> None:
    t = observe_all([10, 11, 8])  # 8 arrived late; 9 missing
    assert (t.expected, t.lost) == (4, 1)
    t.observe(9)
    assert t.lost == 0


def test_sequence_reordering_across_wrap() -> None:
    t = observe_all([0, WRAP - 1, 1])
    assert (t.expected, t.lost) == (3, 0)


def test_sequence_duplicates_count_as_received_and_never_make_lost_negative() -> None:
    t = observe_all([1, 1, 1, 2])
    assert t.received == 4
    assert t.lost == 0
    t = observe_all([1, 3, 3])  # the duplicate hides the loss of 2 (documented)
    assert t.lost == 0


def test_sequence_reset_starts_new_span() -> None:
    t = observe_all([0, 10])
    assert t.lost == 9
    t.reset()
    assert (t.received, t.expected, t.lost) == (0, 0, 0)
    for seq in (WRAP - 1, 0):
        t.observe(seq)
    assert (t.received, t.expected, t.lost) == (2, 2, 0)


def test_sequence_repr() -> None:
    assert "lost=1" in repr(observe_all([0, 2]))
