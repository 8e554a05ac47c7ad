"""`make demo` / `make bench` wiring and the lab's pure parts (no root needed)."""

from __future__ import annotations

import os
import time

import pytest

from l3ptp.controller import cli
from lab import demo, topology
from lab import hosts as lab


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "usage: python -m lab.demo" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_the_operator_cli_has_no_lab_commands(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo` / `make bench` run the lab; the operator's `l3ptp` knows nothing of it."""
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_refuses_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.main([]) == 2
    assert "needs root" in capsys.readouterr().err


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--seconds", "0.1"]) == 2
    with pytest.raises(SystemExit):
        demo.main(["--queues", "0"])


def test_lab_build_refuses_without_root(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with lab.Lab(workdir=str(tmp_path)) as the_lab, pytest.raises(lab.LabError, match="needs root"):
        the_lab.build()


def test_toml_writer_round_trips() -> None:
    import tomllib

    tables = {"node": {"id": "x", "key_file": "/k"}, "networks.demo": {"queues": 2, "mtu": 1280, "on": True,
                                                                        "routes": ["198.19.1.0/24"], "x": 1.5}}
    assert tomllib.loads(topology.toml_text(tables)) == {"node": {"id": "x", "key_file": "/k"},
                                                "networks": {"demo": tables["networks.demo"]}}


def test_toml_writer_root_table_and_subtables() -> None:
    """The helper policy is a root table; a network's underlay is a subtable of the network."""
    import tomllib

    policy = {"controller_uids": [61234], "socket_path": "/run/x \"quoted\".sock"}
    assert tomllib.loads(topology.toml_text({"": policy})) == policy
    tables = {"networks.demo": {"queues": 2}, "networks.demo.underlay": {"port": 4433}, "networks.b": {"mtu": 1280}}
    assert tomllib.loads(topology.toml_text(tables)) == {
        "networks": {"demo": {"queues": 2, "underlay": {"port": 4433}}, "b": {"mtu": 1280}}}


def test_behind_prefixes_contain_the_addresses() -> None:
    import ipaddress

    for name, (v4, v6) in lab.BEHIND.items():
        nets = [ipaddress.ip_network(p) for p in lab.behind_prefixes(name)]
        assert ipaddress.ip_address(v4) in nets[0] and ipaddress.ip_address(v6) in nets[1]
        for net in nets:  # test addresses only
            assert net.subnet_of(ipaddress.ip_network("198.19.0.0/16")) if net.version == 4 \
                else net.subnet_of(ipaddress.ip_network("fd00::/8"))


def test_free_ids_are_unused() -> None:
    import grp
    import pwd

    for n in lab.free_ids(3):
        assert n in lab.DYNAMIC_ID_RANGE
        with pytest.raises(KeyError):
            pwd.getpwuid(n)
        with pytest.raises(KeyError):
            grp.getgrgid(n)


def test_interrupts_keep_a_swallowed_ctrl_c() -> None:
    """A KeyboardInterrupt lost inside a fork hook still stops the command at its next checkpoint."""
    intr = lab.Interrupts()
    intr.check()  # nothing yet
    try:
        intr._on_signal(2, None)
    except KeyboardInterrupt:
        pass  # swallowed, as in logging's fork hook
    assert intr.hit
    with pytest.raises(KeyboardInterrupt):
        intr.check()


def test_interrupts_in_a_forked_child_just_exit() -> None:
    intr = lab.Interrupts()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            intr._on_signal(15, None)
        finally:
            os._exit(1)  # not reached: the handler exits with 128 + signum
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + 15


class _FailingLab:
    """A lab whose first tool run fails, as ping does when Ctrl-C hits the whole group."""

    controller_uid = helper_uid = 61234

    def __init__(self, *, queues: int, say) -> None:
        self.say = say

    def build(self) -> None:
        pass

    def start(self, wait: float) -> None:
        raise lab.LabError("host a: ping -n -c 3 198.19.0.2 failed (130)")

    def close_checked(self, pids: list[int]) -> list[str]:
        return []


@pytest.mark.parametrize("hit", [True, False])
def test_demo_reports_a_lost_ctrl_c_as_interrupted(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], hit: bool) -> None:
    """The KeyboardInterrupt was swallowed in a fork hook and the tool it also hit
    failed: the demo says "interrupted" and exits 130, not "FAILED" and 1."""
    monkeypatch.setattr(lab, "Lab", _FailingLab)
    intr = lab.Interrupts()
    intr.hit = hit
    args = demo.build_parser().parse_args([])
    # The progress checkpoint would raise at once with hit set; let the step fail first.
    monkeypatch.setattr(intr, "check", lambda: None)
    code = demo.run(args, intr)
    out = capsys.readouterr().out
    if hit:
        assert code == 130 and "interrupted" in out and "FAILED" not in out
    else:
        assert code == 1 and "FAILED: host a: ping" in out


def test_alive_says_no_for_a_zombie_and_a_gone_pid() -> None:
    from lab import procs

    assert procs.alive(os.getpid())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while procs.alive(pid) and time.monotonic() < deadline:  # exited, not reaped yet: a zombie
            time.sleep(0.01)
        assert not procs.alive(pid)
    finally:
        os.waitpid(pid, 0)
    assert not procs.alive(pid)


def test_running_uids_and_workers_of_a_missing_namespace() -> None:
    from lab import procs

    assert os.getuid() in procs._running_uids()
    assert procs.workers_in("l3ptp-no-such-namespace") == []
