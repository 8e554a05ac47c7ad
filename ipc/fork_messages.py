"""Messages between the controller and its fork server (the worker "zygote", worker/zygote.py).

Channels
--------
* `FORK_REQUESTS` (controller -> zygote): `ForkWorker`, with the read end of
  the new worker's stdin pipe as its one SCM_RIGHTS fd. The zygote never reads
  that pipe: the controller writes the `WorkerConfig` (tickets, keys) to the
  write end itself once the child exists.
* `FORK_REPLIES` (zygote -> controller): `WorkerForked(pid)` with a pidfd of
  the child as its one fd (opened by the zygote before it could reap the
  child, so the pid cannot have been reused), or `ForkFailed(reason)`; later,
  `ForkedExited(pid, returncode)` once the zygote has reaped that child.

Both travel over a SOCK_SEQPACKET socketpair the controller made (ipc/seqpacket.py framing).
"""

from __future__ import annotations

from typing import Annotated

from .codec import Channel
from .constants import FORK_MESSAGE_MAX
from .control_messages import QueueIndex
from .schema import U32, Message, Range, message
from .types import NetworkName, Reason

__all__ = ["FORK_REPLIES", "FORK_REQUESTS", "ForkFailed", "ForkWorker", "ForkedExited", "WorkerForked"]


@message("fork.worker")
class ForkWorker(Message):
    """Fork a worker for `network`/`queue` (for its name in `ps` and the logs); its stdin comes as the fd."""

    network: NetworkName
    queue: QueueIndex


@message("fork.forked")
class WorkerForked(Message):
    """The child runs; a pidfd of it comes as the fd."""

    pid: U32


@message("fork.failed")
class ForkFailed(Message):
    """No child (fork(2) failed, or a malformed request)."""

    reason: Reason


@message("fork.exited")
class ForkedExited(Message):
    """A child the zygote forked was reaped: `returncode` as asyncio gives it (-N: killed by signal N)."""

    pid: U32
    returncode: Annotated[int, Range(-255, 255)]


FORK_REQUESTS = Channel("fork-requests", FORK_MESSAGE_MAX, (ForkWorker,))
FORK_REPLIES = Channel("fork-replies", FORK_MESSAGE_MAX, (WorkerForked, ForkFailed, ForkedExited))
