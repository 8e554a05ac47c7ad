"""`ipc.text.printable`: the one escaping function for text from outside."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from l3ptp.ipc.text import printable


def test_controls_and_bidi_are_shown_as_escapes() -> None:
    cases = {
        "\x1b[2J": "\\x1b[2J",  # ESC: clear screen
        "\x07": "\\x07",  # BEL
        "a\rb\nc\td\x00": "a\\x0db\\x0ac\\x09d\\x00",
        "\x7f\x85\x9b": "\\x7f\\x85\\x9b",  # DEL, C1 NEL and CSI
        "\u202e\u202a\u2066\u2069\u200f\u061c": "\\u202e\\u202a\\u2066\\u2069\\u200f\\u061c",  # bidi
        "\u200b\u2028\u2029\ufeff": "\\u200b\\u2028\\u2029\\ufeff",
        "\U000f0000": "\\U000f0000",  # private use, astral
        "\ud800": "\\ud800",  # lone surrogate
    }
    for raw, shown in cases.items():
        assert printable(raw) == shown


def test_printable_text_is_left_alone() -> None:
    for text in ("", "peer closed: SHUTDOWN: bye", "héllo wörld ✓ 日本語", "C:\\path\\x1b", "a b"):
        assert printable(text) is text or printable(text) == text


@given(st.text(max_size=200))
def test_output_is_printable_and_escaping_is_idempotent(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert printable(shown) == shown
