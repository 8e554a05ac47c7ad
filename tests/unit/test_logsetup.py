"""The one structlog configuration: JSON lines, bound context, and stdout followed when it changes."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from l3ptp.ipc import logsetup


@pytest.fixture(autouse=True)
def _restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


def test_json_lines_carry_role_pid_and_bound_fields() -> None:
    out = io.StringIO()
    log = logsetup.configure("worker", stream=out, network="office", queue=1)
    log.info("worker_ready", mtu=1280)
    line = json.loads(out.getvalue())
    assert line["event"] == "worker_ready" and line["mtu"] == 1280
    assert line["role"] == "worker" and line["network"] == "office" and line["queue"] == 1
    assert line["level"] == "info" and line["timestamp"].endswith("Z")


def test_default_stream_is_whatever_stdout_is_at_write_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A logger bound (and cached) while one stdout was current keeps working after it is
    replaced and closed: it writes to the new one (a test runner's capture does this)."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    log = logsetup.configure("controller", json=True)
    log.info("one")
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    first.close()
    log.info("two")
    assert json.loads(second.getvalue())["event"] == "two"


def test_level_filters_lower_events() -> None:
    out = io.StringIO()
    log = logsetup.configure("helper", stream=out, level="warning", json=True)
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["loud"]


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "console"])
def test_text_from_outside_is_escaped_in_log_lines(as_json: bool) -> None:
    """A peer's close reason with ESC/BEL/CR/bidi lands in the log escaped,
    in both formats; a traceback keeps its line breaks."""
    out = io.StringIO()
    log = logsetup.configure("worker", stream=out, json=as_json)
    log.warning("peer_closed", reason="\x1b]0;owned\x07\x1b[2J\rroot\u202e", codes=["\x9b1m"])
    try:
        raise ValueError("bad \x1b[31m value")
    except ValueError:
        log.exception("internal_error")
    text = out.getvalue()
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\x9b"):
        assert raw not in text
    if as_json:
        first, second = (json.loads(x) for x in text.splitlines())
        assert first["reason"] == "\\x1b]0;owned\\x07\\x1b[2J\\x0droot\\u202e"
        assert first["codes"] == ["\\x9b1m"]
        assert "Traceback" in second["exception"] and "\n" in second["exception"]
        assert "bad \\x1b[31m value" in second["exception"]
    else:
        assert "\\x1b]0;owned\\x07\\x1b[2J\\x0droot\\u202e" in text
        assert "bad \\x1b[31m value" in text


def test_journal_stream_gets_key_value_lines(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a unit (JOURNAL_STREAM names stdout's device:inode) lines are logfmt, event/network/queue first."""
    with open(tmp_path / "journal", "w+") as out:
        st = __import__("os").fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.delenv("L3PTP_LOG_FORMAT", raising=False)
        log = logsetup.configure("worker", stream=out, network="office", queue=1)
        log.info("worker_ready", reason="peer said \"bye\"")
        out.seek(0)
        line = out.read().strip()
    assert line.startswith("event=worker_ready network=office queue=1 role=worker "), line
    assert 'reason="peer said \\"bye\\""' in line and "level=info" in line


def test_other_stream_with_journal_env_stays_json(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    out = io.StringIO()
    logsetup.configure("helper", stream=out).info("audit", action="Hello")
    assert json.loads(out.getvalue())["action"] == "Hello"
