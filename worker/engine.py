"""QUIC engine adapter: the one place that names the QUIC library.

The rest of the worker gets its classes from `load_engine`. aioquic is the
default and the only engine implemented today; qh3 (a Rust-core fork with a
nearly identical API) can be added here later without touching the shells.
The worker relies on these aioquic internals (pinned by pyproject's version
range): ``QuicConnection._datagrams_pending`` (queue depth),
``_max_datagram_size``, ``_peer_cid.cid`` (exact DATAGRAM budget),
``_remote_max_datagram_frame_size`` and ``tls._peer_certificate`` (pinning).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from l3ptp.ipc.control_messages import Engine

__all__ = ["EngineClasses", "EngineUnavailable", "load_engine"]


class EngineUnavailable(RuntimeError):
    """The requested QUIC engine is not installed or not supported."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineClasses:
    name: Engine
    QuicConnection: Any
    QuicConfiguration: Any
    events: ModuleType
    #: pull_quic_header(Buffer, host_cid_length) and the Buffer class.
    pull_quic_header: Any
    Buffer: Any
    QuicPacketType: Any


def load_engine(engine: Engine = Engine.AUTO) -> EngineClasses:
    """Return the classes of the requested engine (AUTO = aioquic)."""
    if engine in (Engine.AUTO, Engine.AIOQUIC):
        from aioquic.buffer import Buffer
        from aioquic.quic import events
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.packet import QuicPacketType, pull_quic_header

        return EngineClasses(
            name=Engine.AIOQUIC,
            QuicConnection=QuicConnection,
            QuicConfiguration=QuicConfiguration,
            events=events,
            pull_quic_header=pull_quic_header,
            Buffer=Buffer,
            QuicPacketType=QuicPacketType,
        )
    raise EngineUnavailable(f"QUIC engine {engine.value!r} is not supported yet")
