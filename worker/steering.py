"""One UDP port per network (issue 18 item 2): the worker's side of steering by connection ID.

With `underlay.ports = "shared"` every listener worker of a network binds the same UDP port with
SO_REUSEPORT, and the helper's SK_REUSEPORT program (helper/reuseport.py) hands each datagram to the socket of
queue `dcid[0] % queues`. So every connection ID that can come back as a destination CID must carry its queue:

* the listener's host CIDs: the one of its first flight and each NEW_CONNECTION_ID (both engines, hooked in
  their adapters: `EngineClasses.pin_cids`);
* the SCID of a Retry (worker/admission.py takes `cid` from here), which the connector's next Initial
  carries as its DCID;
* the connector's first DCID, so the listener's side receives its Initials on the right queue; a connector's
  own host CIDs are pinned too (harmless; it binds an ephemeral port, not the shared one).

`pin_queue(engine, queue, queues)` returns the engine with a connection class that does all of this; with one
queue it returns the engine unchanged. `QueueGate` (a base of `Tunnel`) counts and drops a datagram whose DCID
belongs to another queue (`dgram_wrong_queue`): it only happens while steering is not in place (a restarting
worker, a program not yet attached) and such a datagram is never fed to an engine or to admission.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable
from typing import Any

from l3ptp.ipc.control_messages import UnderlayPorts, WorkerConfig
from l3ptp.ipc.counters import DropReason
from l3ptp.ipc.types import PeerRole

from .engine import EngineClasses

__all__ = ["QueueGate", "cid_source", "dcid_queue", "pin_queue", "queue_cid", "register_again", "shares_port"]


def queue_cid(queue: int, queues: int, length: int, randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """A random connection ID of `length` bytes whose first byte is `queue` modulo `queues`."""
    first = queue + queues * secrets.randbelow((256 - queue + queues - 1) // queues)
    return bytes([first]) + randbytes(length - 1)


def dcid_queue(data: bytes, queues: int) -> int | None:
    """The queue a datagram's destination CID names (the helper's program reads the same byte); None if too short."""
    at = 6 if data and data[0] & 0x80 else 1
    return data[at] % queues if len(data) > at and (at == 1 or len(data) >= 7) else None


def shares_port(config: WorkerConfig) -> bool:
    """A listener on its network's one UDP port with other queues' workers (SO_REUSEPORT, steered)."""
    return config.ports is UnderlayPorts.SHARED and config.queues > 1 and config.role is PeerRole.LISTEN


def cid_source(config: WorkerConfig) -> Callable[[int], bytes]:
    """randbytes for connection IDs of this worker's queue (the Retry SCIDs of worker/admission.py)."""
    if config.queues <= 1:
        return os.urandom
    return lambda length: queue_cid(config.queue, config.queues, length)


def pin_queue(engine: EngineClasses, queue: int, queues: int) -> EngineClasses:
    """`engine` whose connections issue (and, connecting, address) only CIDs of `queue` (see the module doc)."""
    if queues <= 1:
        return engine
    cls = engine.pin_cids(engine.QuicConnection, lambda length: queue_cid(queue, queues, length))
    return dataclasses.replace(engine, QuicConnection=cls)


def register_again(config: WorkerConfig, sock: Any, ticket: str) -> bool:
    """`Reregister` from the controller (a restarted helper): ProtectSocket again with the fresh `ticket` of
    this queue. Blocking (the caller runs it off the loop); True when the helper's program steers the port."""
    from .helper_client import WorkerHelperClient

    helper = WorkerHelperClient(config.helper_socket)
    try:
        return helper.protect_socket(sock, config.network, config.queue, True, ticket).steered
    finally:
        helper.close()


class QueueGate:
    """A base of `Tunnel` (before `Connections`): datagrams for another queue's connection IDs stop here."""

    config: WorkerConfig
    _drops: Any
    _gate: tuple[int, int] | None = None  # (queue, queues) on a shared port; (-1, 0) elsewhere

    def _foreign(self, data: bytes) -> bool:
        """On a shared port: `data`'s destination CID names another queue (it is not ours to answer)."""
        gate = self._gate
        if gate is None:
            gate = self._gate = (self.config.queue, self.config.queues) if shares_port(self.config) else (-1, 0)
        return bool(gate[1]) and dcid_queue(data, gate[1]) != gate[0]

    def _route(self, data: bytes, addr: tuple[Any, ...], now: float) -> Any:
        if self._foreign(data):
            self._drops[DropReason.DGRAM_WRONG_QUEUE] += 1
            return None
        return super()._route(data, addr, now)  # type: ignore[misc]
