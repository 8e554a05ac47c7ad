"""Shared pytest configuration.

Privileged tests (`@pytest.mark.privileged`, or `pytestmark` in
tests/privileged/) need root: network namespaces, real TUN devices, ping and
iperf3. Where the user is not root they skip cleanly. In CI
(`L3PTP_REQUIRE_PRIVILEGED=1` or `CI` set) a privileged test that skips for
any reason -- not root, a missing tool, a skip inside the test -- is reported
as a failure instead, so a green CI run means they really ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def privileged_required() -> bool:
    return os.environ.get("L3PTP_REQUIRE_PRIVILEGED") == "1" or bool(os.environ.get("CI"))


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None and not is_root():
        pytest.skip("needs root (network namespaces, real TUN devices)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("privileged") is not None and privileged_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped but CI requires it to run: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # "No tests collected" must never pass.
    if session.testscollected == 0 and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


@pytest.fixture(scope="session")
def l3ptp_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb built from this checkout by packaging/build-deb.sh, once per session.

    `L3PTP_TEST_DEB=path` reuses a package built before (for example while
    iterating on the booted-machine tests).
    """
    if prebuilt := os.environ.get("L3PTP_TEST_DEB"):
        return Path(prebuilt)
    from lab.booted import build_deb

    return build_deb(tmp_path_factory.mktemp("deb"))
