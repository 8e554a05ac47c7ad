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


def test_harden_sets_no_new_privs_and_not_dumpable() -> None:
    import subprocess
    import sys

    probe = ("import ctypes; from l3ptp.helper.__main__ import harden_process; libc = ctypes.CDLL(None); "
             "before = (libc.prctl(39, 0, 0, 0, 0), libc.prctl(3, 0, 0, 0, 0)); harden_process(); "
             "print(before, (libc.prctl(39, 0, 0, 0, 0), libc.prctl(3, 0, 0, 0, 0)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    # PR_GET_NO_NEW_PRIVS (39), PR_GET_DUMPABLE (3): off/dumpable before, on/not dumpable after
    assert out.stdout.split() == ["(0,", "1)", "(1,", "0)"], out.stderr


def test_systemd_listener_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from l3ptp.helper.server import systemd_listener

    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd_listener() is None and os.environ["LISTEN_FDS"] == "1"
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert systemd_listener() is None
