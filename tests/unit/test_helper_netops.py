"""helper.netops without a kernel: the error a 0600 /dev/net/tun produces."""

from __future__ import annotations

import errno

import pytest
import pytun

from l3ptp.helper import netops


def test_tun_node_not_accessible_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise pytun.Error(errno.EACCES, "Permission denied")

    monkeypatch.setattr(netops.pytun, "TunTapDevice", refuse)
    with pytest.raises(PermissionError) as info:
        netops.open_queues("l3p-x", 2, 1000)
    assert info.value.errno == errno.EACCES
    assert "/dev/net/tun" in str(info.value) and "0666" in str(info.value)
    assert "systemd-tmpfiles --create l3ptp.conf" in str(info.value)


def test_other_tun_errors_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(**_: object) -> None:
        raise pytun.Error(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(netops.pytun, "TunTapDevice", busy)
    with pytest.raises(OSError) as info:
        netops.open_queues("l3p-x", 1, 1000)
    assert info.value.errno == errno.EBUSY and "0666" not in str(info.value)
