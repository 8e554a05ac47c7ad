"""The newcomer path: `make demo` from a clone only root can read (issue 12, item 3).

The demo and the privileged tests run controllers and workers as other,
unprivileged uids. A clone under /root (mode 0700) cannot give them the
interpreter of a .venv inside it: the Makefile then puts the environment
under /var/lib/l3ptp-dev and the lab, asked to use an unreachable
interpreter anyway, says in one line what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab import hosts as lab

pytestmark = [pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]


def test_lab_names_the_fix_when_the_interpreter_is_private() -> None:
    private = tempfile.mkdtemp(prefix="l3ptp-private-")  # mode 0700, like /root
    try:
        os.symlink(sys.executable, os.path.join(private, "python"))
        the_lab = lab.Lab(python=os.path.join(private, "python"), workdir=private)
        the_lab.controller_uid, the_lab.gid = lab.free_ids(2)
        with pytest.raises(lab.LabError) as exc:
            the_lab._check_python_reachable()
        message = str(exc.value)
        assert "\n" not in message and "Permission denied" in message
        assert "make demo" in message and "/var/lib/l3ptp-dev" in message
    finally:
        shutil.rmtree(private)


@pytest.mark.slow
def test_make_demo_from_a_clone_only_root_can_read() -> None:
    parent = tempfile.mkdtemp(prefix="l3ptp-root-clone-")  # mode 0700: nobody else may enter
    clone = os.path.join(parent, "l3ptp")
    venv_home = Path("/var/lib/l3ptp-dev") / hashlib.sha256(clone.encode()).hexdigest()[:12]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV")}
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), clone], check=True, timeout=120)
        proc = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "demo finished successfully" in out and "Traceback" not in out, out[-4000:]
        assert f"goes to {venv_home}/venv" in out
        assert (venv_home / "venv/.installed").exists() and not os.path.exists(os.path.join(clone, ".venv"))
    finally:
        subprocess.run(["make", "clean"], cwd=clone, env=env, capture_output=True, timeout=120)
        shutil.rmtree(parent, ignore_errors=True)
        shutil.rmtree(venv_home, ignore_errors=True)
