"""`pip install .` installs the l3ptp namespace, no bare top-level module and no harness (lab/, tests/)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


PRODUCT = ("helper", "worker", "controller", "ipc")


@dataclasses.dataclass
class Built:
    wheel: Path
    output: str  # what pip and the build backend printed


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The wheel of this checkout, built once for the module (pip wheel --no-deps, the environment's setuptools)."""
    out_dir = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out_dir), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out_dir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out_dir.glob("l3ptp-*.whl")
    return Built(wheel, proc.stdout + proc.stderr)


@pytest.mark.slow
def test_wheel_installs_only_the_l3ptp_namespace(built: Built, tmp_path: Path) -> None:
    wheel = built.wheel
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"l3ptp", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for pkg in ("helper", "worker", "controller", "ipc"):
        assert f"l3ptp/{pkg}/__init__.py" in names
    assert "l3ptp/__init__.py" not in names  # implicit namespace package

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    installed = {p.name for p in site.iterdir()}
    assert not installed & {"helper", "worker", "controller", "ipc"}
    probe = "import l3ptp.ipc.constants as c, l3ptp.helper, l3ptp.worker, l3ptp.controller; print(c.MTU_DEFAULT)"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1280"


@pytest.mark.slow
def test_wheel_holds_the_product_and_no_harness(built: Built) -> None:
    """Only l3ptp.{helper,worker,controller,ipc}: nothing of lab/ or tests/, under any name."""
    names = [n for n in zipfile.ZipFile(built.wheel).namelist() if ".dist-info/" not in n]
    assert names
    packages = {n.split("/")[1] for n in names}
    assert packages == set(PRODUCT), packages
    # Every module of the wheel is a product source file of the checkout; no harness file is.
    for name in names:
        component, rest = name.split("/", 2)[1:]
        assert (ROOT / component / rest).is_file(), name
    harness = {p.relative_to(ROOT / "lab").as_posix() for p in (ROOT / "lab").rglob("*.py")}
    assert "hosts.py" in harness and "bench/runner.py" in harness
    assert not any(n.split("/", 2)[2] in harness - {"__init__.py", "__main__.py"} for n in names), names
    for word in ("lab", "tests", "demo", "bench", "booted"):
        assert not any(word in part for n in names for part in n.split("/")), word
    # And every product source file is in it: a subpackage left out of pyproject's `packages` (say,
    # controller/config/) would otherwise drop out of the wheel and the .deb without a word.
    shipped = {"/".join(n.split("/")[1:]) for n in names}
    sources = {p.relative_to(ROOT).as_posix() for c in PRODUCT for p in (ROOT / c).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources <= shipped, sorted(sources - shipped)


@pytest.mark.slow
def test_building_prints_no_setuptools_deprecation(built: Built) -> None:
    """Issue 17 item 6: installing printed screens of `project.license` deprecation warnings."""
    for text in ("Deprecat", "deprecat", "BuildBackendWarning", "!!"):
        assert text not in built.output, built.output
