"""`ConfigError` and the error collector every reader records into.

Validation never stops at the first problem: each reader reports through a
`Collector` and returns the `BAD` marker, so the callers can go on and the
final `ConfigError` lists every error, each starting with its key path.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
#: How errors about the document itself (not one of its keys) are labelled.
_ROOT: Final = "(top level)"


class ConfigError(Exception):
    """The configuration could not be read or is invalid.

    `errors` lists every problem found (never just the first), each starting
    with the key path it concerns; `source` names the file (or ``<config>``).
    ``str()`` gives one line per error, ``"<source>: <error>"``.
    """

    def __init__(self, errors: Iterable[str], source: str = "<config>") -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        self.source = source
        super().__init__(self.errors, source)

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {error}" for error in self.errors)


class Bad:
    """Marker for a value that failed validation (its error is recorded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<invalid>"


BAD: Final = Bad()
REQUIRED: Final = object()


Converter: TypeAlias = Callable[[Any, str, "Collector"], Any]


def _describe(value: object) -> str:
    """TOML type name of a decoded value, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return f"a value of type {type(value).__name__}"


def join(path: str, key: str) -> str:
    """Dotted key path, quoting keys that are not TOML bare keys."""
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


class Collector:
    """Collects errors; every reader records its error and returns `BAD`."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(f"{path or _ROOT}: {message}")

    def type_error(self, path: str, expected: str, value: object) -> Bad:
        self.add(path, f"expected {expected}, got {_describe(value)}")
        return BAD

    def table(self, value: object, path: str, known: Sequence[str]) -> Mapping[str, Any] | None:
        """Check that `value` is a table and report each key not in `known`."""
        if not isinstance(value, Mapping):
            self.type_error(path, "a table", value)
            return None
        for key in value:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.add(path, f"unknown key {key!r}{hint}")
        return value

    def field(
        self,
        table: Mapping[str, Any],
        path: str,
        key: str,
        convert: Converter,
        default: Any = REQUIRED,
    ) -> Any:
        """Converted value of `key`, `default` when absent, or `BAD` on error."""
        if key not in table:
            if default is REQUIRED:
                self.add(join(path, key), "required")
                return BAD
            return default
        return convert(table[key], join(path, key), self)


def ok(*values: object) -> bool:
    """True when none of `values` failed validation."""
    return not any(v is BAD for v in values)

