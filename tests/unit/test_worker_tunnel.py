from __future__ import annotations

import ipaddress

from l3ptp.worker.policy import normalize_ip as _normalize_ip


def test_normalize_ip_unmaps_ipv4_mapped_and_strips_scope() -> None:
    assert _normalize_ip("::ffff:198.19.0.2") == ipaddress.ip_address("198.19.0.2")
    assert _normalize_ip("198.19.0.2") == ipaddress.ip_address("198.19.0.2")
    assert _normalize_ip("fd00::1%eth0") == ipaddress.ip_address("fd00::1")
    assert _normalize_ip("not an address") is None
