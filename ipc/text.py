"""Text from outside, made safe to print: the one escaping function.

A peer's CLOSE reason, a QUIC CONNECTION_CLOSE reason phrase, a config
value echoed in an error: any of them may carry terminal control sequences
(ESC clears the screen or sets the window title, BEL rings, CR overwrites
the line) or Unicode bidi overrides that reorder what the operator reads.
`printable` shows each such character as a visible escape (``\\x1b``,
``\\u202e``) and leaves everything else alone.

Every place that prints text which may have come from outside uses it: the
worker when it keeps a peer's text, `l3ptp status` (human output), the log
processor in `ipc/logsetup.py`, the Prometheus label values. It is
idempotent (its output contains only printable characters, and a backslash
is left as it is), so text escaped at one boundary and again at the next
reads the same.

Pure: stdlib only (the CLI imports it).
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every non-printable character shown as an escape.

    Non-printable is Python's `str.isprintable` with the space allowed: C0
    controls (ESC, BEL, CR, LF, TAB, NUL), DEL, C1 controls (0x80-0x9f),
    format characters (bidi overrides and isolates, zero-width joiners),
    line and paragraph separators, surrogates, private-use and unassigned
    code points.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
