from __future__ import annotations

import pytest

from l3ptp.helper.__main__ import main, missing_capabilities


def test_capability_check(tmp_path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert missing_capabilities(str(status)) is None
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert "CAP_NET_ADMIN" in missing_capabilities(str(status))
    assert "CapEff" in missing_capabilities(str(tmp_path / "missing"))


def test_bad_policy_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("controller_uids = [1]\nworker_uids = [2]\nbogus = 1\n")
    assert main(["--policy", str(policy), "--reconcile-only"]) == 2
    err = capsys.readouterr().err
    assert "l3ptp-helper:" in err and ("unknown policy keys: bogus" in err or "owned by root" in err)
