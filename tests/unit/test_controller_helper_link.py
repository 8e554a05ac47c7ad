"""`HelperLink.watch` (controller/helper_link.py): after a new helper session (a restarted helper), but not
after the first, the controller has the workers of shared-port networks register again (`on_new_session`,
NetworkLifecycle.reregister; docs/helper.md, "Shared port"). No socket: the helper client is a fake."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from l3ptp.controller import helper_link
from l3ptp.controller.helper_link import HelperLink


class FakeHelper:
    def __init__(self) -> None:
        self.closed = False

    async def list_networks(self) -> list[Any]:
        class Info:
            name = "office"

        return [Info()]


def test_a_new_helper_session_but_not_the_first_calls_on_new_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(helper_link, "HELPER_PROBE_INTERVAL", 0.01)
    helpers: list[FakeHelper] = []

    async def connect(path: str) -> FakeHelper:
        helpers.append(FakeHelper())
        return helpers[-1]

    async def main() -> None:
        link = HelperLink(connect, lambda: "/nonexistent")
        await link.ensure()  # the controller's first session, at start
        calls: list[set[str]] = []
        networks: list[set[str]] = []

        async def on_networks(known: set[str]) -> None:
            networks.append(known)

        async def on_new_session(known: set[str]) -> None:
            calls.append(known)

        task = asyncio.create_task(link.watch(asyncio.Lock(), on_networks, on_new_session))
        await asyncio.sleep(0.1)
        assert networks and calls == [] and link.sessions == 1  # the first session: nothing to redo
        helpers[-1].closed = True  # the helper restarted: the next probe connects anew
        await asyncio.sleep(0.1)
        assert link.sessions == 2 and calls == [{"office"}]  # once, not at every probe
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 10))
