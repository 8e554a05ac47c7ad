"""The runtime directory and socket permissions of a real controller process.

Design (docs/controller.md, "Sockets and permissions"): the runtime directory
is 0711 (anyone may reach a socket by name, nobody but the owner may list
it); ``control.sock`` is 0660 with group ``admin_group``; ``workers.sock`` is
0600. The first test needs no root: it uses a group the test process may
chgrp to. The second one, as root only, checks what a user outside and
inside that group can actually do.
"""

from __future__ import annotations

import grp
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from l3ptp.controller import cli
from tests.support.controller_process import ControllerProcess, FakeHelperThread, as_user, wait_until, write_toml

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def chgrp_target() -> grp.struct_group:
    """A group this process may give its files: not its own gid when possible."""
    egid = os.getegid()
    if os.geteuid() == 0:
        others = [g for g in grp.getgrall() if g.gr_gid not in (egid, NOBODY)]
    else:
        others = []
        for gid in os.getgroups():
            if gid != egid:
                try:
                    others.append(grp.getgrgid(gid))
                except KeyError:
                    continue
    return others[0] if others else grp.getgrgid(egid)


@contextmanager
def controller(admin_group: str) -> Iterator[ControllerProcess]:
    with tempfile.TemporaryDirectory(prefix="l3p-") as tmp, ExitStack() as stack:
        os.chmod(tmp, 0o711)  # let other users reach the runtime directory below
        runtime = os.path.join(tmp, "run")
        config = os.path.join(tmp, "l3ptp.toml")
        write_toml(
            config,
            {
                "node": {"id": "alpha", "key_file": "/etc/l3ptp/node.key"},
                "controller": {
                    "runtime_dir": runtime,
                    "helper_socket": os.path.join(tmp, "helper.sock"),
                    "admin_group": admin_group,
                },
                "metrics": {"enabled": False},
            },
        )
        helper = FakeHelperThread(os.path.join(tmp, "helper.sock")).start()
        stack.callback(helper.close)
        ctl = ControllerProcess(config, runtime, os.path.join(tmp, "log.jsonl"))
        stack.callback(ctl.cleanup)
        ctl.start()
        wait_until(lambda: ctl.status() is not None, 20, "controller answers", ctl.log_tail)
        yield ctl
        assert ctl.terminate() == 0, ctl.log_tail()


def test_runtime_dir_0711_control_socket_admin_group_workers_socket_0600() -> None:
    group = chgrp_target()
    with controller(group.gr_name) as ctl:
        run = os.stat(ctl.runtime_dir)
        assert stat.S_IMODE(run.st_mode) == 0o711
        control = os.stat(os.path.join(ctl.runtime_dir, "control.sock"))
        assert stat.S_ISSOCK(control.st_mode) and stat.S_IMODE(control.st_mode) == 0o660
        assert control.st_gid == group.gr_gid and control.st_uid == os.geteuid()
        workers = os.stat(os.path.join(ctl.runtime_dir, "workers.sock"))
        assert stat.S_ISSOCK(workers.st_mode) and stat.S_IMODE(workers.st_mode) == 0o600
        assert not ctl.events("admin_group_not_applied")


def test_unknown_admin_group_is_logged_and_the_controller_still_serves() -> None:
    with controller("l3ptp-no-such-group") as ctl:
        control = os.stat(os.path.join(ctl.runtime_dir, "control.sock"))
        assert control.st_gid == os.getegid() and stat.S_IMODE(control.st_mode) == 0o660
        assert ctl.events("admin_group_not_applied")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_admin_group_member_reaches_the_cli_socket_others_do_not() -> None:
    group = chgrp_target()
    assert group.gr_gid != NOBODY
    with controller(group.gr_name) as ctl:

        def probe() -> str:
            out, err = io.StringIO(), io.StringIO()
            rc = cli.main(["--runtime-dir", ctl.runtime_dir, "--timeout", "3", "status"], out=out, err=err)
            try:
                os.listdir(ctl.runtime_dir)
                listed = "listed"
            except PermissionError:
                listed = "not-listed"
            bus = os.access(os.path.join(ctl.runtime_dir, "workers.sock"), os.W_OK)
            return f"{rc} {listed} {'bus-writable' if bus else 'bus-closed'} {err.getvalue().strip()}"

        member = as_user(NOBODY, NOBODY, probe, [group.gr_gid])
        assert member.startswith("0 not-listed bus-closed"), member
        outsider = as_user(NOBODY, NOBODY, probe)
        assert outsider.startswith(f"{cli.EXIT_UNREACHABLE} not-listed bus-closed"), outsider
        assert "permission denied" in outsider and "admin_group" in outsider
