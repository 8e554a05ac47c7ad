"""helper.netops without a kernel: the error a 0600 /dev/net/tun produces."""

from __future__ import annotations

import errno
import os

import pytest
import pytun

from l3ptp.helper import netops


@pytest.mark.parametrize(("code", "hint"), [(errno.EACCES, True), (errno.EBUSY, False)])
def test_only_an_inaccessible_tun_node_names_the_fix(monkeypatch: pytest.MonkeyPatch, code: int, hint: bool) -> None:
    def refuse(**_: object) -> None:
        raise pytun.Error(code, "refused")

    monkeypatch.setattr(netops.pytun, "TunTapDevice", refuse)
    with pytest.raises(OSError) as info:
        netops.open_queues("l3p-x", 2, 1000)
    assert info.value.errno == code
    text = str(info.value)
    assert ("/dev/net/tun" in text and "read-write access" in text and "systemd-tmpfiles --create l3ptp.conf" in text) is hint


@pytest.mark.parametrize("vnet", [False, True])
@pytest.mark.parametrize("adopt", [False, True])
def test_queues_open_in_the_mode_asked_for(monkeypatch: pytest.MonkeyPatch, vnet: bool, adopt: bool) -> None:
    """Every queue of a device with TUN offloads is opened with IFF_VNET_HDR (the first one to attach decides the
    device's mode), created and adopted alike."""
    opened: list[int] = []

    class Device:
        def __init__(self, name: str, flags: int) -> None:
            opened.append(flags)
            self._r, self._w = os.pipe()

        def fileno(self) -> int:
            return self._r

        def close(self) -> None:
            os.close(self._r)
            os.close(self._w)

    monkeypatch.setattr(netops.pytun, "TunTapDevice", Device)
    monkeypatch.setattr(netops.fcntl, "ioctl", lambda *a: 0)
    fds = netops.open_queues("l3p-x", 3, 1000, adopt=adopt, vnet=vnet)
    for fd in fds:
        os.close(fd)
    assert len(opened) == 3 and all(bool(f & netops.IFF_VNET_HDR) is vnet for f in opened)
    assert all(f & netops.TUN_FLAGS == netops.TUN_FLAGS for f in opened)
