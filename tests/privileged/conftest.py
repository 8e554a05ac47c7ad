"""Fixtures shared by the privileged tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.netns import NetnsRegistry


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace of the test's own, deleted at teardown."""
    reg = NetnsRegistry()
    yield reg.create()
    reg.cleanup()
