"""The one structlog configuration used by every l3ptp process.

JSON lines (one object per event, ISO-8601 UTC timestamps) when the output
stream is not a terminal, which is the case in tests; ``key=value`` lines
(logfmt) when it is systemd-journald's stream (the units); readable console
output on a terminal. Each process binds its role (and, for
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

    def fileno(self) -> int:
        return sys.stdout.fileno()


#: Keys first on every journal line, in this order (an operator filters on them).
JOURNAL_KEYS = ["event", "network", "queue", "role", "action", "result"]


def on_journal(stream: Any) -> bool:
    """True when `stream` is systemd-journald's stream (JOURNAL_STREAM names its device:inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        return False


def configure(
    role: str,
    *,
    level: str = "info",
    stream: TextIO | None = None,
    json: bool | None = None,
    **bind: Any,
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog for this process and return the bound root logger.

    `json=None` picks JSON unless `stream` is a terminal or the journal: on
    the journal (a systemd unit's output) each line is ``key=value`` pairs
    (logfmt) starting with `JOURNAL_KEYS`, so ``journalctl -u UNIT -g
    'network=office'`` finds them. `L3PTP_LOG_FORMAT` (`json`, `console` or
    `logfmt`) overrides the choice; `L3PTP_LOG_LEVEL` overrides `level`.
    """
    out = stream if stream is not None else _Stdout()
    env_format = os.environ.get("L3PTP_LOG_FORMAT")
    logfmt = env_format == "logfmt" or (json is None and env_format not in ("json", "console") and on_journal(out))
    if env_format in ("json", "console"):
        json = env_format == "json"
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    level = os.environ.get("L3PTP_LOG_LEVEL", level)
    renderer: Any = (
        structlog.processors.LogfmtRenderer(key_order=JOURNAL_KEYS, drop_missing=True)
        if logfmt
        else structlog.processors.JSONRenderer(sort_keys=False)
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


class LineLimiter:
    """Repeated log lines: per kind (a tuple), the first of a window is written, the rest counted for one summary.

    At most `max_keys` kinds are tracked; past that, new kinds share the one whose first item is None (in the
    helper's audit, kinds are (uid, action, result, code): more uids than that share one summary).
    """

    def __init__(self, window: float, max_keys: int) -> None:
        self.window, self.max_keys = window, max_keys
        self.windows: dict[tuple[Any, ...], list[float]] = {}  # kind -> [window start, lines held back]

    def allow(self, key: tuple[Any, ...], now: float) -> bool:
        if key not in self.windows and len(self.windows) >= self.max_keys:
            key = (None, *key[1:])
        held = self.windows.setdefault(key, [now, -1])
        held[1] += 1
        return held[1] == 0

    def due(self, now: float) -> list[tuple[tuple[Any, ...], int]]:
        """The kinds whose window ended with lines held back, and how many (their windows close)."""
        ended = [(key, int(held[1])) for key, held in self.windows.items() if now - held[0] >= self.window]
        for key, _ in ended:
            del self.windows[key]
        return [(key, n) for key, n in ended if n]
