"""One structured log line per privileged action and per refusal.

`audit(action, peer=..., result=...)` always logs at info level with the
event name ``audit``, the peer's uid and pid (None for the helper's own
actions such as reconcile), the result (ok, refused, failed, violation, ...)
and the objects touched as further fields.
"""

from __future__ import annotations

from typing import Any

import structlog


def audit(action: str, *, peer: Any = None, result: str, role: Any = None, **fields: Any) -> None:
    structlog.get_logger().info(
        "audit",
        action=action,
        peer_uid=getattr(peer, "uid", None),
        peer_pid=getattr(peer, "pid", None),
        role=None if role is None else str(role),
        result=result,
        **fields,
    )
