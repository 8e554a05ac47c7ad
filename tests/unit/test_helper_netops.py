"""helper.netops without a kernel: the error a 0600 /dev/net/tun produces."""

from __future__ import annotations

import errno

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
