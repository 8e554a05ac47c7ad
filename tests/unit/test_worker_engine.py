from __future__ import annotations

import pytest

from l3ptp.ipc.control_messages import Engine
from l3ptp.worker.engine import EngineUnavailable, load_engine


def test_default_engine_is_aioquic() -> None:
    from aioquic.quic.connection import QuicConnection

    engine = load_engine()
    assert engine.name is Engine.AIOQUIC
    assert engine.QuicConnection is QuicConnection
    assert load_engine(Engine.AIOQUIC).QuicConnection is QuicConnection


def test_qh3_not_yet_supported() -> None:
    with pytest.raises(EngineUnavailable):
        load_engine(Engine.QH3)
