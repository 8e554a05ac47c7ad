"""Field specs: one field's type and limits, checked in both directions.

``decode`` turns raw msgpack data from outside into Python values and raises
only `DecodeError`; ``check`` validates values a local caller passed to a
constructor and raises `SchemaError`; ``encode`` turns a value back into
msgpack-ready data. ``ipc/schema.py`` compiles each message field's type hint
into one of these (``_spec_for``) and re-exports them all.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import typing
from typing import TYPE_CHECKING, Any

from .constraints import IPKind
from .errors import DecodeError, SchemaError

if TYPE_CHECKING:
    from .schema import Record

__all__ = [
    "BoolSpec", "BytesSpec", "EnumSpec", "FloatSpec", "IPSpec", "IntSpec", "MapSpec", "OptionalSpec",
    "RecordSpec", "Spec", "TextSpec", "TupleSpec", "kind_name",
]


def kind_name(value: Any) -> str:
    """The type name an error message shows for a value (``nil`` for None)."""
    if value is None:
        return "nil"
    return type(value).__name__


class Spec:
    """One field's type and limits, in both directions."""

    __slots__ = ()

    def decode(self, raw: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value

    # Shared failure helpers: decode side -> DecodeError, check side -> SchemaError.
    @staticmethod
    def _fail(local: bool, path: str, reason: str) -> typing.NoReturn:
        if local:
            raise SchemaError(f"{path}: {reason}")
        raise DecodeError(reason, path)


class IntSpec(Spec):
    __slots__ = ("lo", "hi")

    def __init__(self, lo: float | None, hi: float | None) -> None:
        self.lo, self.hi = lo, hi

    def _validate(self, value: Any, path: str, local: bool) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(local, path, f"expected int, got {kind_name(value)}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            self._fail(local, path, f"{value} outside {self.lo}..{self.hi}")
        return int(value)

    def decode(self, raw: Any, path: str) -> int:
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> int:
        return self._validate(value, path, True)

    def encode(self, value: Any) -> Any:
        return int(value)


class BoolSpec(Spec):
    __slots__ = ()

    def decode(self, raw: Any, path: str) -> bool:
        if type(raw) is not bool:
            self._fail(False, path, f"expected bool, got {kind_name(raw)}")
        return raw

    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            self._fail(True, path, f"expected bool, got {kind_name(value)}")
        return value


class FloatSpec(Spec):
    __slots__ = ("lo", "hi")

    def __init__(self, lo: float | None, hi: float | None) -> None:
        self.lo, self.hi = lo, hi

    def _validate(self, value: float, path: str, local: bool) -> float:
        if not math.isfinite(value):
            self._fail(local, path, "not a finite number")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            self._fail(local, path, f"{value} outside {self.lo}..{self.hi}")
        return value

    def decode(self, raw: Any, path: str) -> float:
        if type(raw) is not float:
            self._fail(False, path, f"expected float, got {kind_name(raw)}")
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> float:
        # Local callers may pass an int; it is stored as a float.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(True, path, f"expected float, got {kind_name(value)}")
        return self._validate(float(value), path, True)

    def encode(self, value: Any) -> Any:
        return float(value)


class TextSpec(Spec):
    __slots__ = ("max_len", "regex")

    def __init__(self, max_len: int, pattern: str | None) -> None:
        self.max_len = max_len
        self.regex = re.compile(pattern) if pattern else None

    def _validate(self, value: Any, path: str, local: bool) -> str:
        if type(value) is not str:
            self._fail(local, path, f"expected str, got {kind_name(value)}")
        if len(value) > self.max_len:
            self._fail(local, path, f"string longer than {self.max_len}")
        if self.regex is not None and self.regex.fullmatch(value) is None:
            self._fail(local, path, f"{value[:64]!r} does not match {self.regex.pattern}")
        return value

    def decode(self, raw: Any, path: str) -> str:
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> str:
        return self._validate(value, path, True)


class IPSpec(Spec):
    """An IP address/prefix/interface carried as its canonical string."""

    __slots__ = ("kind",)

    def __init__(self, kind: IPKind) -> None:
        self.kind = kind

    def _validate(self, value: Any, path: str, local: bool) -> str:
        if type(value) is not str or len(value) > 64:
            self._fail(local, path, f"expected an IP {self.kind.value} string")
        try:
            if self.kind is IPKind.ADDRESS:
                parsed: Any = ipaddress.ip_address(value)
            elif self.kind is IPKind.PREFIX:
                parsed = ipaddress.ip_network(value, strict=True)
            else:
                if "/" not in value:
                    raise ValueError("missing prefix length")
                parsed = ipaddress.ip_interface(value)
        except ValueError as exc:
            self._fail(local, path, f"invalid IP {self.kind.value} {value!r}: {exc}")
        canonical = str(parsed)
        if canonical != value:
            self._fail(local, path, f"{value!r} is not in canonical form {canonical!r}")
        return value

    def decode(self, raw: Any, path: str) -> str:
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> str:
        return self._validate(value, path, True)


class BytesSpec(Spec):
    __slots__ = ("min_len", "max_len")

    def __init__(self, min_len: int, max_len: int) -> None:
        self.min_len, self.max_len = min_len, max_len

    def _validate(self, value: Any, path: str, local: bool) -> bytes:
        if type(value) is not bytes:
            self._fail(local, path, f"expected bytes, got {kind_name(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            self._fail(local, path, f"length {len(value)} outside {self.min_len}..{self.max_len}")
        return value

    def decode(self, raw: Any, path: str) -> bytes:
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> bytes:
        return self._validate(value, path, True)


class EnumSpec(Spec):
    __slots__ = ("enum_type", "by_value", "value_type")

    def __init__(self, enum_type: type[enum.Enum]) -> None:
        self.enum_type = enum_type
        self.by_value = {m.value: m for m in enum_type}
        self.value_type = type(next(iter(enum_type)).value)

    def decode(self, raw: Any, path: str) -> enum.Enum:
        if type(raw) is not self.value_type or raw not in self.by_value:
            self._fail(False, path, f"unknown {self.enum_type.__name__} value {raw!r}"[:200])
        return self.by_value[raw]

    def check(self, value: Any, path: str) -> enum.Enum:
        if not isinstance(value, self.enum_type):
            self._fail(True, path, f"expected {self.enum_type.__name__}, got {kind_name(value)}")
        return value

    def encode(self, value: Any) -> Any:
        return value.value


class OptionalSpec(Spec):
    __slots__ = ("inner",)

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def decode(self, raw: Any, path: str) -> Any:
        return None if raw is None else self.inner.decode(raw, path)

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


class TupleSpec(Spec):
    __slots__ = ("item", "max_items")

    def __init__(self, item: Spec, max_items: int) -> None:
        self.item, self.max_items = item, max_items

    def decode(self, raw: Any, path: str) -> tuple[Any, ...]:
        if type(raw) is not list:
            self._fail(False, path, f"expected array, got {kind_name(raw)}")
        if len(raw) > self.max_items:
            self._fail(False, path, f"more than {self.max_items} items")
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(raw))

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            self._fail(True, path, f"expected tuple, got {kind_name(value)}")
        if len(value) > self.max_items:
            self._fail(True, path, f"more than {self.max_items} items")
        return tuple(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value))

    def encode(self, value: Any) -> Any:
        return [self.item.encode(v) for v in value]


class MapSpec(Spec):
    __slots__ = ("key", "value", "max_items")

    def __init__(self, key: Spec, value: Spec, max_items: int) -> None:
        self.key, self.value, self.max_items = key, value, max_items

    def decode(self, raw: Any, path: str) -> dict[Any, Any]:
        if type(raw) is not dict:
            self._fail(False, path, f"expected map, got {kind_name(raw)}")
        if len(raw) > self.max_items:
            self._fail(False, path, f"more than {self.max_items} entries")
        out = {}
        for k, v in raw.items():
            key = self.key.decode(k, f"{path}.<key>")
            out[key] = self.value.decode(v, f"{path}[{key!r}]")
        return out

    def check(self, value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            self._fail(True, path, f"expected dict, got {kind_name(value)}")
        if len(value) > self.max_items:
            self._fail(True, path, f"more than {self.max_items} entries")
        return {
            self.key.check(k, f"{path}.<key>"): self.value.check(v, f"{path}[{k!r}]")
            for k, v in value.items()
        }

    def encode(self, value: Any) -> Any:
        return {self.key.encode(k): self.value.encode(v) for k, v in value.items()}


class RecordSpec(Spec):
    """A nested record: a msgpack map with exactly the record's fields."""

    __slots__ = ("cls",)

    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def decode(self, raw: Any, path: str) -> Record:
        return self.cls._decode_fields(raw, path)

    def check(self, value: Any, path: str) -> Record:
        if not isinstance(value, self.cls):
            self._fail(True, path, f"expected {self.cls.__name__}, got {kind_name(value)}")
        return value

    def encode(self, value: Any) -> Any:
        return value._encode_fields()

