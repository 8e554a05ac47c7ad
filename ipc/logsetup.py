"""The one structlog configuration used by every l3ptp process.

JSON lines (one object per event, ISO-8601 UTC timestamps) when the output
stream is not a terminal, which is the case under systemd and in tests;
readable console output when it is. Each process binds its role (and, for
workers, network and queue) once, so every line says who wrote it.
Events are canonical names (``event="worker_ready"``) with fields, not prose.
Every string field passes through `ipc.text.printable` (`escape_fields`), so
text from outside (a peer's close reason) cannot put control sequences on
an operator's terminal in either format; tracebacks keep their line breaks.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

from l3ptp.ipc.text import printable

#: Fields whose line breaks are kept (each line is escaped on its own).
_MULTILINE = ("exception", "stack")


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list | tuple):
        return [_escape(v) for v in value]
    return value


def escape_fields(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every string field shown with `printable`."""
    for key, value in event_dict.items():
        if key in _MULTILINE and isinstance(value, str):
            event_dict[key] = "\n".join(printable(line) for line in value.split("\n"))
        else:
            event_dict[key] = _escape(value)
    return event_dict


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Stdout:
    """Whatever `sys.stdout` is when a line is written, not when logging was configured.

    A process that swaps `sys.stdout` after `configure` (a test runner's capture,
    a daemon redirecting its output) would otherwise keep writing into the old,
    perhaps closed, stream through every logger already bound.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()


def configure(
    role: str,
    *,
    level: str = "info",
    stream: TextIO | None = None,
    json: bool | None = None,
    **bind: Any,
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog for this process and return the bound root logger.

    `json=None` picks JSON unless `stream` is a terminal. `L3PTP_LOG_FORMAT`
    (`json` or `console`) overrides the choice; `L3PTP_LOG_LEVEL` overrides
    `level`.
    """
    out = stream if stream is not None else _Stdout()
    env_format = os.environ.get("L3PTP_LOG_FORMAT")
    if env_format in ("json", "console"):
        json = env_format == "json"
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    level = os.environ.get("L3PTP_LOG_LEVEL", level)
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            escape_fields,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid(), **bind)
    return structlog.get_logger()
