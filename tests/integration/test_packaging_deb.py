"""packaging/build-deb.sh builds a Debian package with the right contents.

The package is built once (dpkg-buildpackage through the script, lintian
included when installed) and then inspected with dpkg-deb: files and their
modes, conffiles, maintainer scripts, and the installed entry points run
from the unpacked tree. Needs the Debian packages dpkg-dev, debhelper,
python3.11-dev, python3-pip, python3-setuptools, python3-wheel, gcc (lintian
optional) and access to the Python package index pip is configured with.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = "usr/lib/l3ptp/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("dpkg-buildpackage", "dh", "dpkg-deb", "python3.11")),
        reason="Debian build tools (dpkg-dev, debhelper, python3.11) not installed",
    ),
]


@pytest.fixture(scope="module")
def deb(l3ptp_deb: Path) -> Path:
    """packaging/build-deb.sh's package (lintian included), shared with the booted-machine tests."""
    return l3ptp_deb


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(root / "DEBIAN")], check=True, timeout=120)
    # The bundled interpreter link is relative (../../../../bin/python3.11);
    # give the unpacked tree the system interpreter at that place.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    return root


def listing(deb: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, owner/group) from dpkg-deb -c."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True, timeout=120).stdout
    entries = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        path = fields[5].split(" -> ")[0].removeprefix("./").rstrip("/")
        entries[path] = (fields[0], fields[1])
    return entries


def test_control_fields(deb: Path) -> None:
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], check=True, capture_output=True, text=True, timeout=60).stdout
    assert " Package: l3ptp" in info
    depends = next(line for line in info.splitlines() if line.startswith(" Depends:"))
    assert "python3.11" in depends and "systemd" in depends and "iproute2" in depends
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert f" {script}" in info


def test_files_and_modes(deb: Path) -> None:
    files = listing(deb)
    executables = ["usr/bin/l3ptp", "usr/libexec/l3ptp/l3ptp-helper", "usr/libexec/l3ptp/l3ptp-controller",
                   "usr/libexec/l3ptp/l3ptp-worker"]
    for path in executables:
        assert files[path] == ("-rwxr-xr-x", "root/root"), path
    regular = ["lib/systemd/system/l3ptp-helper.socket", "lib/systemd/system/l3ptp-helper.service",
               "lib/systemd/system/l3ptp-controller.service", "usr/lib/sysusers.d/l3ptp.conf",
               "usr/lib/modules-load.d/l3ptp.conf", "etc/iproute2/rt_protos.d/l3ptp.conf",
               "etc/l3ptp/l3ptp.toml.example", "etc/l3ptp/helper-policy.toml",
               "usr/share/polkit-1/actions/org.l3ptp.policy", "usr/share/polkit-1/rules.d/50-l3ptp.rules",
               f"{VENV}/pyvenv.cfg", f"{SITE}/l3ptp/helper/__main__.py", f"{SITE}/l3ptp/ipc/constants.py"]
    for path in regular:
        assert files[path] == ("-rw-r--r--", "root/root"), path
    for dep in ("aioquic", "pytun", "zmq", "pyroute2", "msgpack", "cryptography"):
        assert any(p.startswith(f"{SITE}/{dep}") for p in files), dep
    # Nothing setuid/setgid, nothing world-writable, nothing under /opt.
    for path, (mode, owner) in files.items():
        assert "s" not in mode and "S" not in mode, (path, mode)
        assert mode.startswith("l") or mode[8] != "w", (path, mode)
        assert owner == "root/root", path
        assert not path.startswith("opt")
    assert not any(p.startswith(f"{SITE}/bin") or "__pycache__" in p for p in files)


def test_no_harness_in_the_package(deb: Path) -> None:
    """The package ships the product only: l3ptp.{helper,worker,controller,ipc}, nothing of lab/ or tests/."""
    files = listing(deb)
    ours = {p.split("/")[len(SITE.split("/")) + 1] for p in files if p.startswith(f"{SITE}/l3ptp/")}
    assert ours == {"helper", "worker", "controller", "ipc"}, ours
    assert not any(p.startswith((f"{SITE}/lab", f"{SITE}/tests")) for p in files)
    harness = {p.name for p in (ROOT / "lab").rglob("*.py")} - {"__init__.py", "__main__.py", "worker.py"}
    assert "hosts.py" in harness and "demo.py" in harness
    assert not [p for p in files if p.startswith(f"{SITE}/l3ptp/") and p.rsplit("/", 1)[-1] in harness]


def test_conffiles(tree: Path) -> None:
    conffiles = set((tree / "DEBIAN/conffiles").read_text().split())
    assert conffiles == {"/etc/l3ptp/l3ptp.toml.example", "/etc/iproute2/rt_protos.d/l3ptp.conf",
                         "/etc/l3ptp/helper-policy.toml"}
    assert (tree / "etc/l3ptp/helper-policy.toml").read_bytes() == (ROOT / "packaging/etc/helper-policy.toml").read_bytes()
    example = (tree / "etc/l3ptp/l3ptp.toml.example").read_text()
    assert 'runtime_dir = "/run/l3ptp/ctl"' in example


def test_maintainer_scripts(tree: Path) -> None:
    postinst = (tree / "DEBIAN/postinst").read_text()
    assert postinst.count("# Automatically added by dh_installsysusers") == 1
    assert "systemd-sysusers l3ptp.conf" in postinst
    # The policy is a conffile now: no maintainer script writes or deletes it.
    assert "@L3PTP_UID@" not in postinst and "helper-policy.toml.in" not in postinst
    for unit in ("l3ptp-helper.socket", "l3ptp-helper.service", "l3ptp-controller.service"):
        assert f"deb-systemd-helper enable '{unit}'" in postinst
    assert postinst.index("systemd-sysusers l3ptp.conf") < postinst.index("deb-systemd-invoke")
    postrm = (tree / "DEBIAN/postrm").read_text()
    assert "rm -f /etc/l3ptp/helper-policy.toml" not in postrm
    for script in ("postinst", "prerm", "postrm"):
        path = tree / "DEBIAN" / script
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)


def test_no_build_paths_in_the_environment(tree: Path) -> None:
    venv = tree / VENV
    assert os.readlink(venv / "bin/python3.11") == "../../../../bin/python3.11"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and "command" not in cfg and "executable" not in cfg
    for exe in ("usr/bin/l3ptp", "usr/libexec/l3ptp/l3ptp-helper"):
        assert (tree / exe).read_text().startswith("#!/usr/lib/l3ptp/venv/bin/python3 -I\n")


def run_entry(tree: Path, exe: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", str(tree / exe), *args],
        input=stdin, capture_output=True, timeout=60,
    )
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                       out.stderr.decode(errors="replace"))


def test_installed_helper_runs(tree: Path) -> None:
    out = run_entry(tree, "usr/libexec/l3ptp/l3ptp-helper", "--help")
    assert out.returncode == 0, out.stderr
    assert "--reconcile-only" in out.stdout and "--cleanup" in out.stdout
    # It imports from the bundled tree, not from the source checkout.
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c", "import l3ptp.helper, aioquic, pytun; print(l3ptp.helper.__file__)"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(tree / SITE))


def test_the_package_carries_the_workers_c_module(tree: Path) -> None:
    """The build has a compiler (Build-Depends: gcc): the bundled worker runs its C fast path, not the fallback."""
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c",
         "from l3ptp.worker import native, _fastpath; print(native.REASON, _fastpath.__file__)"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert probe.returncode == 0, probe.stderr
    reason, path = probe.stdout.split()
    assert reason == "c" and path.startswith(str(tree / SITE / "l3ptp/worker/_fastpath.")), probe.stdout


def test_installed_helper_policy_is_accepted(tree: Path) -> None:
    """The shipped conffile, read by the bundled helper code, with "l3ptp" resolving to 998."""
    code = (
        "import pwd, sys\n"
        "real = pwd.getpwnam\n"
        "pwd.getpwnam = lambda n: pwd.struct_passwd(('l3ptp', 'x', 998, 998, '', '/', '/bin/false')) if n == 'l3ptp' else real(n)\n"
        "from l3ptp.helper.policy import load_policy\n"
        "p = load_policy(sys.argv[1], check_owner=False)\n"
        "print(sorted(p.controller_uids), sorted(p.worker_uids))\n"
    )
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c", code, str(tree / "etc/l3ptp/helper-policy.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[998] [998]"


def test_installed_worker_rejects_bad_stdin(tree: Path) -> None:
    out = run_entry(tree, "usr/libexec/l3ptp/l3ptp-worker", stdin=b"\xc1")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("exe", "module"), [
    ("usr/libexec/l3ptp/l3ptp-controller", "controller/__main__.py"),
    ("usr/bin/l3ptp", "controller/cli.py"),
])
def test_installed_controller_and_cli_run(tree: Path, exe: str, module: str) -> None:
    if not (tree / SITE / "l3ptp" / module).exists():
        pytest.skip(f"l3ptp/{module} has not landed yet")
    out = run_entry(tree, exe, "--help")
    assert out.returncode == 0, out.stderr


def test_example_config_is_valid(tree: Path, tmp_path: Path) -> None:
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c",
         "import sys; from l3ptp.controller.config import load_config; c = load_config(sys.argv[1]); print(c.controller.runtime_dir)",
         str(tree / "etc/l3ptp/l3ptp.toml.example")],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "/run/l3ptp/ctl"


# ---- the maintainer scripts, run for real in a throwaway root ---------------------------------------

#: Runs inside the throwaway root with the system python3 (stdlib only): what
#: the package left on the "machine", as JSON.
PROBE = r'''
import glob, grp, json, os, pwd, subprocess, sys

def st(path):
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return None
    return {"uid": s.st_uid, "gid": s.st_gid, "mode": oct(s.st_mode & 0o7777)}

def user(name):
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None

def group(name):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None

out = {
    "users": {u: user(u) for u in ("l3ptp", "l3ptp-helper")},
    "groups": {g: group(g) for g in ("l3ptp", "l3ptp-admin")},
    "etc_l3ptp": st("/etc/l3ptp"),
    "policy": st("/etc/l3ptp/helper-policy.toml"),
    "polkit": [p for p in ("/usr/share/polkit-1/actions/org.l3ptp.policy",
                           "/usr/share/polkit-1/rules.d/50-l3ptp.rules") if os.path.exists(p)],
    "wants": sorted(os.path.basename(p) for p in glob.glob("/etc/systemd/system/*.wants/l3ptp-*")),
    "pycache": len(glob.glob("/usr/lib/l3ptp/venv/lib/python3.11/site-packages/l3ptp/*/__pycache__")),
    "status": subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "l3ptp"],
                             capture_output=True, text=True).stdout.strip(),
}
if os.path.exists("/usr/lib/l3ptp/venv/bin/python3") and out["policy"]:
    # The real helper code, with the real owner check, reads the conffile.
    code = ("from l3ptp.helper.policy import load_policy; "
            "p = load_policy('/etc/l3ptp/helper-policy.toml'); "
            "print(sorted(p.controller_uids), sorted(p.worker_uids))")
    r = subprocess.run(["/usr/lib/l3ptp/venv/bin/python3", "-I", "-c", code], capture_output=True, text=True)
    out["policy_loaded"] = r.stdout.strip() or r.stderr.strip()[-500:]
print(json.dumps(out))
'''

#: Inside the private mount namespace: an overlay of the host's root whose
#: writes land in a tmpfs, /dev and /proc bound in, then dpkg in a chroot.
SCRIPT = r'''
set -eu
tmp=$1 deb=$2
mount -t tmpfs -o mode=0755 l3ptp-test "$tmp/ovl"
mkdir "$tmp/ovl/upper" "$tmp/ovl/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$tmp/ovl/upper,workdir=$tmp/ovl/work" "$tmp/root"
r=$tmp/root
mount --bind /dev "$r/dev"
mount -t proc proc "$r/proc"
mkdir -p "$r/run" && mount -t tmpfs -o mode=0755 run "$r/run"   # no /run/systemd/system: nothing is started
mkdir -p "$r/tmp" && mount -t tmpfs -o mode=1777 tmp "$r/tmp"
cp "$deb" "$r/tmp/l3ptp.deb"
cp "$tmp/probe.py" "$r/tmp/probe.py"
in_root() { chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }
step() {  # step NAME CMD...: run, keep its output and exit status, then probe
    name=$1; shift
    set +e; in_root "$@" > "$tmp/out/$name.log" 2>&1; echo $? > "$tmp/out/$name.rc"; set -e
    in_root python3 /tmp/probe.py > "$tmp/out/$name.json" 2> "$tmp/out/$name.probe-err" || true
}
step before true
step install dpkg -i /tmp/l3ptp.deb
step reinstall dpkg -i /tmp/l3ptp.deb
step remove dpkg --remove l3ptp
step purge dpkg --purge l3ptp
'''


@pytest.mark.privileged
def test_maintainer_scripts_in_a_throwaway_root(deb: Path, tmp_path: Path) -> None:
    """dpkg -i, -i again (upgrade path), --remove and --purge, for real, in a copy-on-write root.

    The root is an overlay of the host's / whose writes go to a tmpfs, in a
    private mount namespace, entered with chroot: the maintainer scripts,
    debhelper's snippets, systemd-sysusers, deb-systemd-helper and dpkg's
    database all run unmodified, and everything they write disappears with
    the namespace. /run is empty there (no /run/systemd/system), so, as on a
    machine without systemd running, nothing is started.
    """
    if any(shutil.which(t) is None for t in ("unshare", "chroot", "mount")):
        pytest.skip("needs unshare, chroot and mount (util-linux, coreutils)")
    if subprocess.run(["dpkg-query", "-W", "l3ptp"], capture_output=True, timeout=30).returncode == 0:
        pytest.skip("l3ptp is installed on this machine: the throwaway root would start from it")
    for d in ("ovl", "root", "out"):
        (tmp_path / d).mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", str(tmp_path), str(deb)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    def result(step: str) -> dict[str, Any]:
        out = tmp_path / "out"
        rc = int((out / f"{step}.rc").read_text())
        log = (out / f"{step}.log").read_text(errors="replace")
        assert rc == 0, f"{step} failed ({rc}):\n{log[-4000:]}"
        text = (out / f"{step}.json").read_text()
        assert text, (out / f"{step}.probe-err").read_text()
        data: dict[str, Any] = json.loads(text)
        data["log"] = log
        return data

    before = result("before")
    assert before["status"] == ""

    installed = result("install")
    assert installed["status"] == "ii", installed["log"][-3000:]
    uid = installed["users"]["l3ptp"]
    assert uid not in (None, 0) and installed["users"]["l3ptp-helper"] not in (None, 0, uid)
    assert installed["groups"]["l3ptp"] is not None and installed["groups"]["l3ptp-admin"] is not None
    assert installed["etc_l3ptp"] == {"uid": 0, "gid": installed["groups"]["l3ptp"], "mode": "0o751"}
    assert installed["policy"] == {"uid": 0, "gid": 0, "mode": "0o644"}
    # The helper's own loader (owner check included) resolves "l3ptp" to the new user.
    assert installed["policy_loaded"] == f"[{uid}] [{uid}]"
    assert len(installed["polkit"]) == 2
    assert installed["wants"] == ["l3ptp-controller.service", "l3ptp-helper.service", "l3ptp-helper.socket"]
    assert installed["pycache"] >= 4  # postinst byte-compiled helper, controller, worker, ipc

    again = result("reinstall")
    assert again["status"] == "ii"
    assert again["users"] == installed["users"] and again["policy_loaded"] == installed["policy_loaded"]
    assert "helper-policy.toml" not in again["log"]  # the unchanged conffile is kept without a question

    removed = result("remove")
    assert removed["status"] == "rc"  # removed, configuration files kept
    assert removed["policy"] is not None and removed["pycache"] == 0 and removed["polkit"] == []
    # deb-systemd-helper keeps the enablement until purge (a reinstall restores the same state).
    assert removed["wants"] == installed["wants"]

    purged = result("purge")
    assert purged["status"] == ""
    assert purged["policy"] is None and purged["etc_l3ptp"] is None and purged["wants"] == []
    # Nothing of l3ptp stays on purge: users and groups go too.
    assert purged["users"] == {"l3ptp": None, "l3ptp-helper": None}
    assert purged["groups"] == {"l3ptp": None, "l3ptp-admin": None}
