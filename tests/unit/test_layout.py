"""The product imports nothing of the harness: no `l3ptp.*` module imports `lab` or `tests` (issue 17).

Every module of helper/, worker/, controller/ and ipc/ is parsed (not
imported) and every import in it is looked at: `import x`, `from x import
y` (relative ones resolve inside the product), and `importlib.import_module`
/ `__import__` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("helper", "worker", "controller", "ipc")
HARNESS = ("lab", "tests")


def product_modules() -> list[Path]:
    return sorted(p for component in PRODUCT for p in (ROOT / component).rglob("*.py"))


def imported_names(source: str) -> list[str]:
    """Absolute module names `source` imports, literal dynamic imports included."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__"):
                names.append(node.args[0].value)
    return names


def harness_imports(source: str) -> list[str]:
    return [n for n in imported_names(source) if n.split(".")[0] in HARNESS]


def test_the_scan_sees_every_kind_of_import() -> None:
    source = """
import lab
import os, tests.support.netns
from lab.hosts import Lab
from . import lab as sibling
from ..ipc import constants
import importlib
importlib.import_module("lab.demo")
__import__("tests")
importlib.import_module(f"l3ptp.{name}")
"""
    assert harness_imports(source) == ["lab", "tests.support.netns", "lab.hosts", "lab.demo", "tests"]


def test_there_are_product_modules_to_scan() -> None:
    modules = product_modules()
    assert len(modules) > 40
    assert {m.relative_to(ROOT).parts[0] for m in modules} == set(PRODUCT)


@pytest.mark.parametrize("path", product_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_product_module_imports_the_harness(path: Path) -> None:
    assert harness_imports(path.read_text()) == []


def test_the_harness_is_not_in_the_product_folders() -> None:
    """What moved to lab/ stays there (controller/lab.py, bench.py, demo.py; tests/support/netns.py ...)."""
    for gone in ("controller/lab.py", "controller/bench.py", "controller/demo.py", "tests/support/netns.py",
                 "tests/support/booted.py", "tests/support/bench_worker.py"):
        assert not (ROOT / gone).exists(), gone
    for there in ("lab/netns.py", "lab/hosts.py", "lab/demo.py", "lab/bench/runner.py", "lab/booted.py",
                  "lab/bench/worker.py"):
        assert (ROOT / there).is_file(), there


#: Issue 17: a product module that grows past this is doing more than one job; split it along its jobs.
MAX_PRODUCT_LINES = 500


def test_every_product_module_is_under_500_lines() -> None:
    big = {str(p.relative_to(ROOT)): n for p in product_modules()
           if (n := len(p.read_text().splitlines())) >= MAX_PRODUCT_LINES}
    assert not big, f"product modules of {MAX_PRODUCT_LINES} lines or more: {big}"
