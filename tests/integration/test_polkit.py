"""The controller asks a real polkitd, over a real (private) system bus, about CLI callers.

Set-up (root only, nothing on the host changes):

* a private system bus: ``dbus-daemon`` with a temporary configuration
  listening on a socket in a temporary directory;
* ``/usr/lib/polkit-1/polkitd`` on that bus (``DBUS_SYSTEM_BUS_ADDRESS``),
  started inside ``unshare --mount --propagation private`` where
  ``/usr/share/polkit-1/actions`` shows only our ``org.l3ptp.policy``,
  ``/usr/share/polkit-1/rules.d`` only our ``50-l3ptp.rules``,
  ``/etc/polkit-1/rules.d`` a test rule, and ``/etc/passwd`` / ``/etc/group``
  copies with test users: ``l3ptp`` (the controller's user, owner of the
  actions), ``l3ptp-t-ok`` in group ``l3ptp-t-ops`` (the test rule allows
  both actions), ``l3ptp-t-ro`` (allowed status only), ``l3ptp-t-no``
  (nothing), ``l3ptp-t-other`` (a controller user that does not own the
  actions). The namespace, and with it every bind mount, goes away with
  polkitd;
* a real controller process (``python -m l3ptp.controller``, fake helper)
  running as the test ``l3ptp`` uid (not root: polkit must accept it as the
  actions' owner) with ``[controller] polkit = true``;
* CLI callers: forked children running the real CLI code as the test uids.

Processes started here are stopped by pid.
"""

from __future__ import annotations

import contextlib
import grp
import io
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from l3ptp.controller import cli
from tests.support.controller_process import ControllerProcess, FakeHelperThread, as_user, wait_until, write_toml

ROOT = Path(__file__).resolve().parents[2]
POLKIT_DIR = ROOT / "packaging/polkit"
POLKITD = "/usr/lib/polkit-1/polkitd"

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

TEST_RULE = """\
// test only: l3ptp-t-ops may do everything, l3ptp-t-ro may read the status.
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("org.l3ptp.") == 0 && subject.isInGroup("l3ptp-t-ops")) {
        return polkit.Result.YES;
    }
    if (action.id == "org.l3ptp.status" && subject.user == "l3ptp-t-ro") {
        return polkit.Result.YES;
    }
});
"""


@dataclass(frozen=True)
class Users:
    controller: int  # "l3ptp": owns the actions
    ok: int  # in l3ptp-t-ops
    ro: int  # status only
    no: int  # nothing
    other: int  # a controller user that does not own the actions
    ops_gid: int


def free_ids(count: int) -> list[int]:
    """`count` consecutive ids that are neither a uid nor a gid on this host."""
    base = 61000
    while True:
        ids = list(range(base, base + count))
        taken = False
        for i in ids:
            with contextlib.suppress(KeyError):
                pwd.getpwuid(i)
                taken = True
            with contextlib.suppress(KeyError):
                grp.getgrgid(i)
                taken = True
        if not taken:
            return ids
        base += 100


NAMES = ("l3ptp", "l3ptp-t-ok", "l3ptp-t-ro", "l3ptp-t-no", "l3ptp-t-other", "l3ptp-t-ops")


def _without(text: str, names: tuple[str, ...]) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if line.split(":", 1)[0] not in names)


@dataclass
class PolkitBus:
    address: str
    users: Users
    polkitd: subprocess.Popen[bytes]
    log: Path


def _bus_call_ok(address: str) -> bool:
    """Whether org.freedesktop.PolicyKit1 has an owner on the bus at `address`."""
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection

    dbus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus")
    try:
        with open_dbus_connection(address) as conn:
            reply = conn.send_and_get_reply(
                new_method_call(dbus, "NameHasOwner", "s", ("org.freedesktop.PolicyKit1",)), timeout=2
            )
            return bool(reply.body[0])
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def polkit_bus() -> Iterator[PolkitBus]:
    missing = [t for t in ("dbus-daemon", "unshare", "mount") if shutil.which(t) is None]
    if missing or not os.access(POLKITD, os.X_OK):
        pytest.skip(f"needs dbus-daemon, util-linux and polkitd (missing: {missing or [POLKITD]})")
    ids = free_ids(6)
    users = Users(*ids[:5], ops_gid=ids[5])
    with tempfile.TemporaryDirectory(prefix="l3p-polkit-") as tmp_str, contextlib.ExitStack() as stack:
        tmp = Path(tmp_str)
        os.chmod(tmp, 0o755)  # polkitd (user polkitd) reads the mounted dirs; the test uids reach the bus
        sock = tmp / "system_bus_socket"
        (tmp / "bus.conf").write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>system</type><listen>unix:path={sock}</listen><auth>EXTERNAL</auth>"
            '<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/>'
            '<allow receive_sender="*"/></policy></busconfig>\n'
        )
        actions, rules_usr, rules_etc = tmp / "actions", tmp / "rules-usr", tmp / "rules-etc"
        for d in (actions, rules_usr, rules_etc):
            d.mkdir(mode=0o755)
        shutil.copy(POLKIT_DIR / "org.l3ptp.policy", actions)
        shutil.copy(POLKIT_DIR / "50-l3ptp.rules", rules_usr)
        (rules_etc / "40-l3ptp-test.rules").write_text(TEST_RULE)
        nologin = "::/nonexistent:/usr/sbin/nologin\n"
        passwd = _without(Path("/etc/passwd").read_text(), NAMES) + "".join(
            f"{name}:x:{uid}:{uid}{nologin}"
            for name, uid in zip(NAMES[:5], (users.controller, users.ok, users.ro, users.no, users.other))
        )
        group = _without(Path("/etc/group").read_text(), NAMES) + "".join(
            f"{name}:x:{uid}:\n"
            for name, uid in zip(NAMES[:5], (users.controller, users.ok, users.ro, users.no, users.other))
        ) + f"l3ptp-t-ops:x:{users.ops_gid}:l3ptp-t-ok\n"
        (tmp / "passwd").write_text(passwd)
        (tmp / "group").write_text(group)
        for f in (*actions.iterdir(), *rules_usr.iterdir(), *rules_etc.iterdir(), tmp / "passwd", tmp / "group"):
            os.chmod(f, 0o644)

        # dbus-daemon refuses connections of uids unknown to NSS: it sees the
        # test users through the same /etc/passwd and /etc/group binds.
        users_binds = [(tmp / "passwd", "/etc/passwd"), (tmp / "group", "/etc/group")]
        bus = subprocess.Popen(
            in_namespace(users_binds, ["dbus-daemon", f"--config-file={tmp / 'bus.conf'}", "--nofork", "--nopidfile"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, bus)
        wait_until(sock.exists, 10, "the private system bus")
        address = f"unix:path={sock}"

        binds = [(actions, "/usr/share/polkit-1/actions"), (rules_usr, "/usr/share/polkit-1/rules.d"),
                 (rules_etc, "/etc/polkit-1/rules.d"), *users_binds]
        log = tmp / "polkitd.log"
        with open(log, "wb") as fh:
            polkitd = subprocess.Popen(
                in_namespace(binds, [POLKITD, "--no-debug"]),
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address),
            )
        stack.callback(_stop, polkitd)
        try:
            wait_until(lambda: polkitd.poll() is not None or _bus_call_ok(address), 20, "polkitd on the private bus")
        except AssertionError:
            raise AssertionError(f"polkitd did not come up:\n{log.read_text(errors='replace')}") from None
        if polkitd.poll() is not None:
            raise AssertionError(f"polkitd exited with {polkitd.returncode}:\n{log.read_text(errors='replace')}")
        # The bind mounts exist only in polkitd's namespace.
        assert "l3ptp-t-ok" not in Path("/etc/passwd").read_text()
        assert not (Path("/etc/polkit-1/rules.d") / "40-l3ptp-test.rules").exists()
        yield PolkitBus(address, users, polkitd, log)


def in_namespace(binds: list[tuple[Path, str]], argv: list[str]) -> list[str]:
    """argv run in a private mount namespace where each (source, target) is bind-mounted.

    ``unshare`` and ``sh`` exec, so the returned command's pid is argv's.
    """
    mounts = " && ".join(f"mount --bind '{src}' '{dst}'" for src, dst in binds)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class UserControllerProcess(ControllerProcess):
    """A ControllerProcess started as `uid` (groups `groups`) with a given system bus."""

    def __init__(self, *args: str, uid: int, groups: list[int], bus: str) -> None:
        super().__init__(*args)
        self.uid, self.groups, self.bus = uid, groups, bus

    def start(self) -> UserControllerProcess:
        env = dict(os.environ, L3PTP_LOG_FORMAT="json", DBUS_SYSTEM_BUS_ADDRESS=self.bus)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "l3ptp.controller", "--config", self.config_path],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                user=self.uid, group=self.uid, extra_groups=self.groups, cwd="/",
            )
        return self


def admin_host_group() -> grp.struct_group:
    """A host group for admin_group (the fast path): not root's, not nobody's."""
    return next(g for g in grp.getgrall() if g.gr_gid not in (0, 65534))


@contextlib.contextmanager
def controller(uid: int, bus: str, admin_group: grp.struct_group) -> Iterator[ControllerProcess]:
    with tempfile.TemporaryDirectory(prefix="l3p-") as tmp, contextlib.ExitStack() as stack:
        os.chmod(tmp, 0o711)
        runtime = os.path.join(tmp, "run")
        os.mkdir(runtime, 0o711)
        os.chown(runtime, uid, uid)
        config = os.path.join(tmp, "l3ptp.toml")
        write_toml(config, {
            "node": {"id": "alpha", "key_file": "/etc/l3ptp/node.key"},
            "controller": {
                "runtime_dir": runtime,
                "helper_socket": os.path.join(tmp, "helper.sock"),
                "admin_group": admin_group.gr_name,
                "polkit": True,
            },
            "metrics": {"enabled": False},
        })
        os.chmod(config, 0o644)
        helper = FakeHelperThread(os.path.join(tmp, "helper.sock"), uid=uid).start()
        stack.callback(helper.close)
        os.chmod(os.path.join(tmp, "helper.sock"), 0o666)
        ctl = UserControllerProcess(config, runtime, os.path.join(tmp, "log.jsonl"), uid=uid,
                                    groups=[admin_group.gr_gid], bus=bus)
        stack.callback(ctl.cleanup)
        ctl.start()
        wait_until(lambda: ctl.status() is not None, 20, "controller answers root", ctl.log_tail)
        yield ctl
        assert ctl.terminate() == 0, ctl.log_tail()


def cli_as(ctl: ControllerProcess, uid: int, gid: int, *argv: str) -> tuple[int, str]:
    def run() -> str:
        out, err = io.StringIO(), io.StringIO()
        rc = cli.main(["--runtime-dir", ctl.runtime_dir, "--timeout", "8", *argv], out=out, err=err)
        return f"{rc}\n{out.getvalue()}{err.getvalue()}"

    rc, _, text = as_user(uid, gid, run).partition("\n")
    return int(rc), text


def test_polkit_decides_for_callers_the_controller_does_not_trust(polkit_bus: PolkitBus) -> None:
    u = polkit_bus.users
    admin = admin_host_group()
    with controller(u.controller, polkit_bus.address, admin) as ctl:
        control = os.stat(os.path.join(ctl.runtime_dir, "control.sock"))
        assert stat.S_IMODE(control.st_mode) == 0o666 and control.st_uid == u.controller

        # Allowed by the test rule (group l3ptp-t-ops): status and reload.
        rc, text = cli_as(ctl, u.ok, u.ok, "status")
        assert rc == cli.EXIT_OK and "node alpha" in text, text
        rc, text = cli_as(ctl, u.ok, u.ok, "reload")
        assert rc == cli.EXIT_OK and "not authorised" not in text, text
        # Status only: the request type picks the action.
        rc, text = cli_as(ctl, u.ro, u.ro, "status")
        assert rc == cli.EXIT_OK, text
        rc, text = cli_as(ctl, u.ro, u.ro, "down", "office")
        assert rc == cli.EXIT_FAILED and "not authorised: org.l3ptp.manage" in text and "NOT_PERMITTED" in text, text
        # Nothing: auth_admin by default, which a caller without an agent cannot satisfy.
        for argv, action in ((("status",), "org.l3ptp.status"), (("reload",), "org.l3ptp.manage"),
                             (("up", "office"), "org.l3ptp.manage")):
            rc, text = cli_as(ctl, u.no, u.no, *argv)
            assert rc == cli.EXIT_FAILED and f"not authorised: {action}" in text, (argv, text)
        # admin_group (by gid) is trusted without asking polkit, which would refuse this uid.
        rc, text = cli_as(ctl, u.no, admin.gr_gid, "reload")
        assert rc == cli.EXIT_OK, text

        asked = {(e["uid"], e["action"]) for e in ctl.events("cli_authorised")}
        assert asked == {(u.ok, "org.l3ptp.status"), (u.ok, "org.l3ptp.manage"), (u.ro, "org.l3ptp.status")}
        assert all(e["how"] == "polkit" for e in ctl.events("cli_authorised"))
        refused = ctl.events("cli_refused")
        assert {(e["uid"], e["action"]) for e in refused} == {
            (u.ro, "org.l3ptp.manage"), (u.no, "org.l3ptp.status"), (u.no, "org.l3ptp.manage")}
        assert all(e["how"] == "polkit" for e in refused), refused
        # The refusals changed nothing: nothing was reloaded by a refused caller.
        assert len(ctl.events("reloaded")) == 2


def test_fail_closed_without_polkit(polkit_bus: PolkitBus) -> None:
    """No system bus: every caller polkit would have to decide for is refused; trusted ones still pass."""
    u = polkit_bus.users
    with tempfile.TemporaryDirectory() as nowhere:
        with controller(u.controller, f"unix:path={nowhere}/no-bus", admin_host_group()) as ctl:
            rc, text = cli_as(ctl, u.ok, u.ok, "status")
            assert rc == cli.EXIT_FAILED and "not authorised: org.l3ptp.status" in text
            assert "polkit could not be asked" in text, text
            assert [e["how"] for e in ctl.events("cli_refused")] == ["polkit-error"]
            rc, text = cli_as(ctl, u.controller, u.controller, "status")  # the controller's own uid
            assert rc == cli.EXIT_OK, text


def test_a_controller_user_that_does_not_own_the_actions_cannot_ask(polkit_bus: PolkitBus) -> None:
    """polkit refuses CheckAuthorization about other users to anyone but root and the action owner.

    The shipped action file names ``unix-user:l3ptp`` as owner; a controller
    running as another user gets an error from polkit, and the caller is
    refused (fail closed) even though the rule would allow them.
    """
    u = polkit_bus.users
    with controller(u.other, polkit_bus.address, admin_host_group()) as ctl:
        rc, text = cli_as(ctl, u.ok, u.ok, "status")
        assert rc == cli.EXIT_FAILED and "not authorised" in text, text
        (event,) = ctl.events("cli_refused")
        assert event["how"] == "polkit-error" and "Only trusted callers" in event["reason"], event
