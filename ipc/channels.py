"""Every IPC channel of l3ptp, for tools and tests that iterate over them."""

from __future__ import annotations

from .codec import Channel
from .control_messages import BUS_DOWN, BUS_UP, CLI_REPLIES, CLI_REQUESTS, WORKER_CONFIG
from .fork_messages import FORK_REPLIES, FORK_REQUESTS
from .helper_messages import HELPER_REPLIES, HELPER_REQUESTS
from .peer_messages import PEER_CONTROL

ALL_CHANNELS: tuple[Channel, ...] = (
    HELPER_REQUESTS,
    HELPER_REPLIES,
    WORKER_CONFIG,
    BUS_UP,
    BUS_DOWN,
    CLI_REQUESTS,
    CLI_REPLIES,
    PEER_CONTROL,
    FORK_REQUESTS,
    FORK_REPLIES,
)
