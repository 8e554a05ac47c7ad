"""A worker's REALITY side (issue 15; docs/protocol.md, "REALITY"): what the tunnel shell calls.

Listener: `RealityListener` puts the gate (worker/reality_gate.py) in front of
the QUIC engine for every sender without a session or candidate, relays the
refused ones to the camouflage target (worker/relay.py) once its address is
resolved, and expires both on a 1 s timer. Connector: `quic_settings` gives
the ALPN and SNI of an ordinary HTTP/3 client, and `connect` seals its first
flight (worker/reality_engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import structlog

from l3ptp.ipc.control_messages import WorkerConfig
from l3ptp.ipc.types import PeerRole

from . import reality
from .reality_engine import connect_sealed
from .reality_gate import RealityGate
from .relay import Camouflage, CamouflageRelay

__all__ = ["HTTP3_ALPN", "RealityListener", "connect", "enabled", "quic_settings"]

log = structlog.get_logger()

#: The ALPN of both ends with REALITY: what every HTTP/3 client and server says (RFC 9114).
HTTP3_ALPN = "h3"
#: Seconds between expiry passes over pending senders and relay flows; between retries of a failed resolve.
TICK = 1.0
RESOLVE_RETRY = 30.0


def enabled(config: WorkerConfig) -> bool:
    return bool(config.reality_key)


def quic_settings(config: WorkerConfig, alpn: str, server_name: str) -> tuple[str, str | None]:
    """(ALPN, SNI) of this worker's QUIC configuration: l3ptp's own, or an HTTP/3 client's with REALITY."""
    if not enabled(config):
        return alpn, server_name
    return HTTP3_ALPN, config.server_name or None


def connect(conn: Any, addr: Any, now: float, config: WorkerConfig) -> None:
    """The connector's `conn.connect`, sealed when REALITY is on."""
    if not enabled(config):
        conn.connect(addr, now=now)
        return
    short_id = config.reality_short_ids[0] if config.reality_short_ids else b""
    connect_sealed(conn, addr, now, config.reality_key, short_id)


class RealityListener:
    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        assert config.role is PeerRole.LISTEN and enabled(config)
        self.config, self.sock = config, sock
        cred = reality.Credential(private_key=config.reality_key, short_ids=frozenset(config.reality_short_ids))
        self.has_target = bool(config.camouflage_host and config.camouflage_port)
        self.camouflage = Camouflage(RealityGate(cred, camouflage=self.has_target), None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.resolve_failures = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while self.has_target and self.camouflage.relay is None:
            try:
                infos = await loop.getaddrinfo(self.config.camouflage_host, self.config.camouflage_port,
                                               type=socket.SOCK_DGRAM)
                target = infos[0][4][:2]
            except (OSError, IndexError) as exc:
                self.resolve_failures += 1
                log.warning("camouflage_unresolved", target=self.config.camouflage_host, error=str(exc),
                            retry_in=RESOLVE_RETRY)
                await asyncio.sleep(RESOLVE_RETRY)
                continue
            if self._is_self(target):
                log.error("camouflage_is_this_listener", target=f"{target[0]}:{target[1]}",
                          reason="relaying to ourselves would loop; unauthenticated senders get no answer")
                self.has_target = False
                self.camouflage.gate.camouflage = False
                break
            self.camouflage.relay = CamouflageRelay(loop, target, self._send_back)
            log.info("camouflage_ready", target=f"{self.config.camouflage_host}:{self.config.camouflage_port}",
                     address=target[0])
        while True:
            await asyncio.sleep(TICK)
            self.camouflage.tick(loop.time())

    def _is_self(self, target: tuple[Any, ...]) -> bool:
        """Is `target` this listener's own socket (its address, or any address when bound to a wildcard)?"""
        host, port = self.sock.getsockname()[:2]
        if int(target[1]) != int(port):
            return False
        wildcard = host in ("0.0.0.0", "::")
        return wildcard or str(target[0]) in (host, host.removeprefix("::ffff:"))

    def _send_back(self, data: bytes, addr: Any) -> None:
        self.sock.sendto(data, addr)

    def datagram(self, addr: Any, data: bytes, now: float) -> tuple[bytes, ...]:
        """What of this sender's datagram (and what the gate buffered before it) goes to the engine."""
        return self.camouflage.datagram(addr, data, now, time.time())

    def counters(self) -> dict[str, int]:
        """Named counters for the worker's status (prefixed reality_ and relay_)."""
        out = {("reality_" + k if not k.startswith("relay_") else k): v for k, v in self.camouflage.status().items()}
        out["reality_resolve_failures"] = self.resolve_failures
        return out

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.camouflage.relay is not None:
            with contextlib.suppress(Exception):
                self.camouflage.relay.close()
