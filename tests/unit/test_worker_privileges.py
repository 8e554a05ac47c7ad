"""worker.privileges.drop_privileges: capset only when there is something to drop."""

from __future__ import annotations

import errno

import pytest

from l3ptp.worker import privileges


def fake_kernel(monkeypatch: pytest.MonkeyPatch, caps: int) -> list[int]:
    """Caps all `caps` until capset(0) succeeds; capset refused (EPERM) like under the unit's filter."""
    state = {"caps": caps}
    calls: list[int] = []

    def capset(mask: int) -> None:
        calls.append(mask)
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(privileges, "prctl", lambda *a: 0)
    monkeypatch.setattr(privileges, "capset", capset)
    monkeypatch.setattr(privileges, "read_status_caps", lambda: {
        "CapInh": state["caps"], "CapPrm": state["caps"], "CapEff": state["caps"], "CapBnd": 0, "CapAmb": 0,
        "NoNewPrivs": 1})
    return calls


def test_no_capset_when_the_sets_are_already_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    # The controller unit: empty bounding set, capset in the refused @privileged group.
    calls = fake_kernel(monkeypatch, caps=0)
    status = privileges.drop_privileges()
    assert calls == [] and status["CapEff"] == 0


def test_capset_still_runs_and_fails_loudly_when_caps_remain(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_kernel(monkeypatch, caps=1 << 12)
    with pytest.raises(privileges.PrivilegeError, match="capset failed: errno 1"):
        privileges.drop_privileges()
    assert calls == [0]
