"""packaging/build-deb.sh builds a Debian package with the right contents.

The package is built once (dpkg-buildpackage through the script, lintian
included when installed) and then inspected with dpkg-deb: files and their
modes, conffiles, maintainer scripts, and the installed entry points run
from the unpacked tree. Needs the Debian packages dpkg-dev, debhelper,
python3.11-dev, python3-pip, python3-setuptools, python3-wheel, gcc (lintian
optional) and access to the Python package index pip is configured with.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging/build-deb.sh"
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
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, TMPDIR=str(tmp_path_factory.mktemp("build")))
    proc = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, timeout=1100, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (pkg,) = out.glob("l3ptp_*.deb")
    return pkg


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
               "etc/l3ptp/l3ptp.toml.example", "usr/share/l3ptp/helper-policy.toml.in",
               f"{VENV}/pyvenv.cfg", f"{SITE}/l3ptp/helper/__main__.py", f"{SITE}/l3ptp/ipc/constants.py"]
    for path in regular:
        assert files[path] == ("-rw-r--r--", "root/root"), path
    for dep in ("aioquic", "pytun", "zmq", "pyroute2", "msgpack", "cryptography"):
        assert any(p.startswith(f"{SITE}/{dep}") for p in files), dep
    # Nothing setuid/setgid, nothing world-writable, nothing under /opt, and
    # the generated policy is not shipped (postinst writes it).
    for path, (mode, owner) in files.items():
        assert "s" not in mode and "S" not in mode, (path, mode)
        assert mode.startswith("l") or mode[8] != "w", (path, mode)
        assert owner == "root/root", path
        assert not path.startswith("opt")
    assert "etc/l3ptp/helper-policy.toml" not in files
    assert not any(p.startswith(f"{SITE}/bin") or "__pycache__" in p for p in files)


def test_conffiles(tree: Path) -> None:
    conffiles = set((tree / "DEBIAN/conffiles").read_text().split())
    assert conffiles == {"/etc/l3ptp/l3ptp.toml.example", "/etc/iproute2/rt_protos.d/l3ptp.conf"}
    example = (tree / "etc/l3ptp/l3ptp.toml.example").read_text()
    assert 'runtime_dir = "/run/l3ptp/ctl"' in example


def test_maintainer_scripts(tree: Path) -> None:
    postinst = (tree / "DEBIAN/postinst").read_text()
    assert postinst.count("# Automatically added by dh_installsysusers") == 1
    assert "systemd-sysusers l3ptp.conf" in postinst
    assert "/etc/l3ptp/helper-policy.toml" in postinst and "@L3PTP_UID@" in postinst
    for unit in ("l3ptp-helper.socket", "l3ptp-helper.service", "l3ptp-controller.service"):
        assert f"deb-systemd-helper enable '{unit}'" in postinst
    assert postinst.index("systemd-sysusers l3ptp.conf") < postinst.index("deb-systemd-invoke")
    postrm = (tree / "DEBIAN/postrm").read_text()
    assert "rm -f /etc/l3ptp/helper-policy.toml" in postrm
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
    assert "--reconcile-only" in out.stdout
    # It imports from the bundled tree, not from the source checkout.
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c", "import l3ptp.helper, aioquic, pytun; print(l3ptp.helper.__file__)"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(tree / SITE))


def test_installed_helper_policy_template_is_accepted(tree: Path, tmp_path: Path) -> None:
    policy = tmp_path / "helper-policy.toml"
    policy.write_text((tree / "usr/share/l3ptp/helper-policy.toml.in").read_text().replace("@L3PTP_UID@", "998"))
    probe = subprocess.run(
        [str(tree / VENV / "bin/python3"), "-I", "-c",
         "import sys; from l3ptp.helper.policy import load_policy; print(sorted(load_policy(sys.argv[1], check_owner=False).controller_uids))",
         str(policy)],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[998]"


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
