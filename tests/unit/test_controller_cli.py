"""Where the `l3ptp` CLI looks for the controller (no controller needed)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from l3ptp.controller import cli
from l3ptp.ipc.constants import RUNTIME_DIR_DEFAULT


def socket_of(argv: list[str]) -> str:
    args = cli.build_parser().parse_args([*argv, "status"])
    return cli._socket_path(args)


@pytest.fixture
def no_default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "absent.toml"
    monkeypatch.setattr(cli, "CONFIG_DEFAULT", str(path))
    return path


def test_default_is_the_controller_units_runtime_directory(no_default_config: Path) -> None:
    assert RUNTIME_DIR_DEFAULT == "/run/l3ptp/ctl"
    assert socket_of([]) == "/run/l3ptp/ctl/control.sock"


def test_runtime_dir_comes_from_the_default_config_when_readable(
    no_default_config: Path, tmp_path: Path
) -> None:
    no_default_config.write_text('[node]\nid = "a"\n[controller]\nruntime_dir = "/srv/l3/ctl"\n')
    assert socket_of([]) == "/srv/l3/ctl/control.sock"
    # --runtime-dir and --socket win over the file.
    assert socket_of(["--runtime-dir", str(tmp_path)]) == f"{tmp_path}/control.sock"
    assert socket_of(["--socket", "/x/y.sock"]) == "/x/y.sock"


def test_explicit_config(tmp_path: Path, no_default_config: Path) -> None:
    cfg = tmp_path / "l3ptp.toml"
    cfg.write_text('[controller]\nruntime_dir = "/srv/other"\n')
    assert socket_of(["--config", str(cfg)]) == "/srv/other/control.sock"
    # A file without runtime_dir (or an unusable one) means the controller's default.
    cfg.write_text('[node]\nid = "a"\n')
    assert socket_of(["--config", str(cfg)]) == f"{RUNTIME_DIR_DEFAULT}/control.sock"
    cfg.write_text('[controller]\nruntime_dir = "relative"\n')
    assert socket_of(["--config", str(cfg)]) == f"{RUNTIME_DIR_DEFAULT}/control.sock"
    # Only runtime_dir is read: an otherwise invalid file still points at the controller.
    cfg.write_text('[controller]\nruntime_dir = "/srv/other"\nbogus = 1\n')
    assert socket_of(["--config", str(cfg)]) == "/srv/other/control.sock"


def test_unreadable_default_config_falls_back_silently(no_default_config: Path) -> None:
    no_default_config.write_text("this is = = not toml")
    assert socket_of([]) == f"{RUNTIME_DIR_DEFAULT}/control.sock"


def test_unreadable_explicit_config_is_a_usage_error(tmp_path: Path) -> None:
    err = io.StringIO()
    rc = cli.main(["--config", str(tmp_path / "nope.toml"), "status"], out=io.StringIO(), err=err)
    assert rc == cli.EXIT_USAGE
    assert "cannot read" in err.getvalue() and "nope.toml" in err.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    err = io.StringIO()
    assert cli.main(["--config", str(bad), "status"], out=io.StringIO(), err=err) == cli.EXIT_USAGE


def test_config_points_the_cli_at_a_socket(tmp_path: Path) -> None:
    """With --config the CLI reports the configured directory when nothing runs there."""
    cfg = tmp_path / "l3ptp.toml"
    cfg.write_text(f'[controller]\nruntime_dir = "{tmp_path}/run"\n')
    err = io.StringIO()
    rc = cli.main(["--config", str(cfg), "status"], out=io.StringIO(), err=err)
    assert rc == cli.EXIT_UNREACHABLE
    assert f"{tmp_path}/run/control.sock" in err.getvalue() and "not running" in err.getvalue()
