"""QUIC engine adapter: the one place that names the QUIC library.

The rest of the worker gets everything engine-specific from `load_engine`:
the connection and configuration classes, the events module, and a handful
of small functions (`EngineClasses`) for what the two engines expose
differently. ``Tunnel`` never reads a private attribute of a connection.

This module is engine-neutral (the interface and the selection); the
engines are in `engine_aioquic` (default, pure Python) and `engine_qh3`
(optional extra ``fast``; same API, packet core in Rust), each imported
only when it is first loaded. `Engine.AUTO` picks qh3 when it imports, else
aioquic. The two engines interoperate (tests run every pairing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from l3ptp.ipc.constants import QUIC_OVERHEAD_NO_CID
from l3ptp.ipc.control_messages import Engine

__all__ = ["EngineClasses", "EngineUnavailable", "available_engines", "load_engine", "payload_budget"]


class EngineUnavailable(RuntimeError):
    """The requested QUIC engine is not installed or not supported."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineClasses:
    name: Engine
    QuicConnection: Any
    QuicConfiguration: Any
    events: ModuleType
    #: configure_tls(cfg, is_client, key, cert): TLS settings for our pinning
    #: (client: no CA check, Ed25519 offered; server: the node's cert + key).
    configure_tls: Callable[[Any, bool, Ed25519PrivateKey, x509.Certificate | None], None]
    #: Largest DATAGRAM payload the connection can send in one packet now.
    datagram_budget: Callable[[Any], int]
    #: DATAGRAMs queued and not yet sent.
    queue_depth: Callable[[Any], int]
    #: receive_many(conn, datagrams, addr, now): feed received UDP payloads in order.
    receive_many: Callable[[Any, list[bytes], Any, float], None]
    #: Smoothed RTT in seconds (0.0 before the first sample).
    smoothed_rtt: Callable[[Any], float]
    #: The peer's leaf certificate after the handshake, or None.
    peer_certificate: Callable[[Any], x509.Certificate | None]
    #: Start a QUIC key update (RFC 9001, 6); False, and nothing done, while
    #: the handshake is not confirmed (an endpoint must not update before).
    update_keys: Callable[[Any], bool]
    #: pin_cids(connection class, new_cid): a subclass whose host CIDs (first and NEW_CONNECTION_ID) and, as a
    #: client, first destination CID are `new_cid(length)` (one UDP port per network: worker/steering.py).
    pin_cids: Callable[[type, Callable[[int], bytes]], type]


def payload_budget(max_datagram_size: int, cid_len: int, remote_frame_max: int | None) -> int:
    """Largest DATAGRAM payload in one packet: `max_datagram_size` bytes, `cid_len`-byte peer CID, and
    within the peer's max_datagram_frame_size (`remote_frame_max`, None if unknown)."""
    budget = max_datagram_size - QUIC_OVERHEAD_NO_CID - cid_len
    if remote_frame_max is not None:
        budget = min(budget, remote_frame_max - 3)
    return max(0, budget)


_CACHE: dict[Engine, EngineClasses] = {}


def load_engine(engine: Engine = Engine.AUTO) -> EngineClasses:
    """The classes of the requested engine (AUTO = qh3 if importable, else aioquic)."""
    if engine is Engine.AUTO:
        try:
            return load_engine(Engine.QH3)
        except EngineUnavailable:
            return load_engine(Engine.AIOQUIC)
    cached = _CACHE.get(engine)
    if cached is None:
        if engine is Engine.AIOQUIC:
            from .engine_aioquic import aioquic_engine

            cached = aioquic_engine()
        elif engine is Engine.QH3:
            from .engine_qh3 import qh3_engine

            cached = qh3_engine()
        else:
            raise EngineUnavailable(f"unknown QUIC engine {engine!r}")
        _CACHE[engine] = cached
    return cached


def available_engines() -> list[Engine]:
    """Engines that load here, aioquic first."""
    out = []
    for engine in (Engine.AIOQUIC, Engine.QH3):
        try:
            load_engine(engine)
        except EngineUnavailable:
            continue
        out.append(engine)
    return out
