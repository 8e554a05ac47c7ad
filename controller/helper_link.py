"""The controller's session with the helper: connect, reconnect, reconcile, notice what a restart lost.

Shell. One `HelperClient` at a time; `ensure` reconnects when the session
was lost. At start `reconcile` destroys the helper's networks that are no
longer configured and enabled and returns the others (to adopt). `watch`
asks the helper for its networks every HELPER_PROBE_INTERVAL, logs a lost
and a regained helper, and hands the names it knows to `on_networks` (which
restarts the networks a restarted helper no longer has), and after every new
session but the first calls `on_new_session` (the networks on one shared UDP
port have their workers register their sockets again: a restarted helper
lost the steering map; docs/helper.md, "Shared port").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from l3ptp.controller.config import Config
from l3ptp.controller.helper_client import HelperClient, HelperError

__all__ = ["HELPER_PROBE_INTERVAL", "HelperConnect", "HelperLink"]

#: Seconds between liveness probes of the helper (ListNetworks).
HELPER_PROBE_INTERVAL = 2.0

HelperConnect = Callable[[str], Any]  # async (path) -> HelperClient

log = structlog.get_logger("l3ptp.controller")


class HelperLink:
    def __init__(self, connect: HelperConnect, socket_path: Callable[[], str]) -> None:
        self._connect = connect
        self._socket_path = socket_path
        self.helper: HelperClient | None = None
        #: Sessions opened so far (a new one may be a restarted helper's).
        self.sessions = 0

    async def ensure(self) -> HelperClient:
        """The helper session, connected anew when there is none or it was lost."""
        if self.helper is None or self.helper.closed:
            self.helper = await self._connect(self._socket_path())
            self.sessions += 1
        return self.helper

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()

    async def reconcile(self, config: Config) -> dict[str, Any]:
        """Destroy the helper's networks that are no longer wanted; return the others (name -> NetworkInfo)."""
        helper = await self.ensure()
        wanted = {n.name for n in config.networks if n.enabled}
        present = {}
        for info in await helper.list_networks():
            if info.name not in wanted:
                log.info("reconcile_destroy", network=info.name)
                with contextlib.suppress(HelperError):
                    await helper.destroy_network(info.name)
            else:
                present[info.name] = info
        return present

    async def watch(self, ops: asyncio.Lock, on_networks: Callable[[set[str]], Awaitable[None]],
                    on_new_session: Callable[[set[str]], Awaitable[None]] | None = None) -> None:
        """Notice a lost helper, reconnect, and rebuild what a restarted helper no longer has.

        A helper that restarts (crash, upgrade) adopts our interfaces and
        routes, so normally nothing is lost. A network whose interface was
        deleted meanwhile is unknown to it: every HELPER_PROBE_INTERVAL the
        controller asks the helper for its networks (under `ops`); once the
        helper answers again, `on_networks` gets their names and restarts each
        network of ours it does not know (workers stopped, network created
        anew, workers spawned with fresh tickets, routes re-added as the peer
        re-announces them).
        """
        lost, seen = False, self.sessions
        while True:
            await asyncio.sleep(HELPER_PROBE_INTERVAL)
            async with ops:
                try:
                    helper = await self.ensure()
                    known = {info.name for info in await helper.list_networks()}
                except HelperError as exc:
                    if not lost:
                        log.error("helper_lost", error=str(exc))
                    lost = True
                    continue
                if lost:
                    log.info("helper_reconnected")
                    lost = False
                await on_networks(known)
                if self.sessions != seen and on_new_session is not None:
                    await on_new_session(known)
                seen = self.sessions
