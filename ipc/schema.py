"""Typed message schemas: frozen dataclasses with declared field constraints.

Conventions
-----------
* A message is declared with ``@message("tag")`` on a class whose fields carry
  type hints. The decorator turns it into a
  ``@dataclass(frozen=True, slots=True, kw_only=True)``, compiles one field
  spec per field, and registers the tag. ``@record`` does the same for a type
  that only appears nested inside messages (it has no tag).
* Constraints ride on ``typing.Annotated``: ``Annotated[int, Range(0, 255)]``,
  ``Annotated[str, Text(64, r"[a-z]+")]``, ``Annotated[tuple[Prefix, ...],
  Items(256)]``. Supported base types: ``int`` (never ``bool``), ``bool``,
  ``float`` (finite), ``str``, ``bytes``, ``tuple[T, ...]``, ``dict[str, T]``,
  ``enum`` subclasses (carried by value), nested records, and ``T | None``.
* Each spec has two directions. ``decode`` turns raw msgpack data from outside
  into Python values and raises only `DecodeError`; ``check`` validates values
  a local caller passed to the constructor and raises `SchemaError`. Both apply
  the same limits, so nothing the local side can build is rejected by the
  remote side, and nothing outside the schema gets in.
* Only ``ipc/codec.py`` calls msgpack; this module never sees bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import types
import typing
from typing import Annotated, Any, ClassVar

from .errors import DecodeError, SchemaError

# --------------------------------------------------------------------------
# Constraint markers (used inside Annotated[...])
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """Inclusive integer (or float) range."""

    lo: float
    hi: float


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    """String length cap (in characters) and optional full-match pattern."""

    max_len: int
    pattern: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Blob:
    """Bytes length bounds."""

    max_len: int
    min_len: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Items:
    """Maximum number of items in a tuple or dict."""

    max_items: int


class IPKind(enum.Enum):
    ADDRESS = "address"
    PREFIX = "prefix"  # strict network, no host bits
    INTERFACE = "interface"  # address with prefix length


@dataclasses.dataclass(frozen=True, slots=True)
class IP:
    """A string that must parse as an IP address, prefix or interface."""

    kind: IPKind


DEFAULT_TEXT_MAX = 4096
DEFAULT_BYTES_MAX = 64 * 1024
DEFAULT_ITEMS_MAX = 1024

U8 = Annotated[int, Range(0, 0xFF)]
U16 = Annotated[int, Range(0, 0xFFFF)]
U32 = Annotated[int, Range(0, 0xFFFF_FFFF)]
U64 = Annotated[int, Range(0, 0xFFFF_FFFF_FFFF_FFFF)]
AddressStr = Annotated[str, IP(IPKind.ADDRESS)]
PrefixStr = Annotated[str, IP(IPKind.PREFIX)]
InterfaceStr = Annotated[str, IP(IPKind.INTERFACE)]

# --------------------------------------------------------------------------
# Field specs
# --------------------------------------------------------------------------


def _kind(value: Any) -> str:
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
            self._fail(local, path, f"expected int, got {_kind(value)}")
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
            self._fail(False, path, f"expected bool, got {_kind(raw)}")
        return raw

    def check(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            self._fail(True, path, f"expected bool, got {_kind(value)}")
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
            self._fail(False, path, f"expected float, got {_kind(raw)}")
        return self._validate(raw, path, False)

    def check(self, value: Any, path: str) -> float:
        # Local callers may pass an int; it is stored as a float.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(True, path, f"expected float, got {_kind(value)}")
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
            self._fail(local, path, f"expected str, got {_kind(value)}")
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
            self._fail(local, path, f"expected bytes, got {_kind(value)}")
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
            self._fail(True, path, f"expected {self.enum_type.__name__}, got {_kind(value)}")
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
            self._fail(False, path, f"expected array, got {_kind(raw)}")
        if len(raw) > self.max_items:
            self._fail(False, path, f"more than {self.max_items} items")
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(raw))

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            self._fail(True, path, f"expected tuple, got {_kind(value)}")
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
            self._fail(False, path, f"expected map, got {_kind(raw)}")
        if len(raw) > self.max_items:
            self._fail(False, path, f"more than {self.max_items} entries")
        out = {}
        for k, v in raw.items():
            key = self.key.decode(k, f"{path}.<key>")
            out[key] = self.value.decode(v, f"{path}[{key!r}]")
        return out

    def check(self, value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, dict):
            self._fail(True, path, f"expected dict, got {_kind(value)}")
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
            self._fail(True, path, f"expected {self.cls.__name__}, got {_kind(value)}")
        return value

    def encode(self, value: Any) -> Any:
        return value._encode_fields()


def _spec_for(hint: Any, owner: str) -> Spec:
    """Compile a type hint (possibly Annotated) into a Spec."""
    marks: list[Any] = []
    while typing.get_origin(hint) is Annotated:
        base, *extra = typing.get_args(hint)
        marks.extend(extra)
        hint = base
    rng = next((m for m in marks if isinstance(m, Range)), None)
    origin = typing.get_origin(hint)

    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{owner}: only `T | None` unions are supported")
        inner = args[0]
        if marks:
            inner = Annotated[(inner, *marks)]  # type: ignore[misc]
        return OptionalSpec(_spec_for(inner, owner))
    if hint is bool:
        return BoolSpec()
    if hint is int:
        return IntSpec(rng.lo if rng else None, rng.hi if rng else None)
    if hint is float:
        return FloatSpec(rng.lo if rng else None, rng.hi if rng else None)
    if hint is str:
        ip = next((m for m in marks if isinstance(m, IP)), None)
        if ip is not None:
            return IPSpec(ip.kind)
        text = next((m for m in marks if isinstance(m, Text)), None)
        return TextSpec(text.max_len if text else DEFAULT_TEXT_MAX, text.pattern if text else None)
    if hint is bytes:
        blob = next((m for m in marks if isinstance(m, Blob)), None)
        return BytesSpec(blob.min_len if blob else 0, blob.max_len if blob else DEFAULT_BYTES_MAX)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return EnumSpec(hint)
    if isinstance(hint, type) and issubclass(hint, Record):
        return RecordSpec(hint)
    items = next((m for m in marks if isinstance(m, Items)), None)
    max_items = items.max_items if items else DEFAULT_ITEMS_MAX
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{owner}: only tuple[T, ...] is supported")
        return TupleSpec(_spec_for(args[0], owner), max_items)
    if origin is dict:
        key, value = typing.get_args(hint)
        return MapSpec(_spec_for(key, owner), _spec_for(value, owner), max_items)
    raise TypeError(f"{owner}: unsupported field type {hint!r}")


# --------------------------------------------------------------------------
# Records and messages
# --------------------------------------------------------------------------


class Record:
    """Base of every schema type. Instances are frozen and validated."""

    __slots__ = ()
    _specs: ClassVar[dict[str, Spec]]

    def __post_init__(self) -> None:
        cls_name = type(self).__name__
        for name, spec in self._specs.items():
            value = getattr(self, name)
            checked = spec.check(value, f"{cls_name}.{name}")
            if checked is not value:
                object.__setattr__(self, name, checked)

    @classmethod
    def _decode_fields(cls, raw: Any, path: str) -> Any:
        if type(raw) is not dict:
            raise DecodeError(f"expected map, got {_kind(raw)}", path)
        specs = cls._specs
        if len(raw) != len(specs) or any(k not in specs for k in raw):
            unknown = sorted(str(k)[:40] for k in raw if k not in specs)
            missing = sorted(k for k in specs if k not in raw)
            detail = []
            if unknown:
                detail.append(f"unknown fields {unknown[:5]}")
            if missing:
                detail.append(f"missing fields {missing}")
            raise DecodeError(", ".join(detail) or "bad field set", path)
        obj = object.__new__(cls)
        prefix = f"{path}." if path else ""
        for name, spec in specs.items():
            object.__setattr__(obj, name, spec.decode(raw[name], prefix + name))
        return obj

    def _encode_fields(self) -> dict[str, Any]:
        return {name: spec.encode(getattr(self, name)) for name, spec in self._specs.items()}


class Message(Record):
    """A top-level message: a Record with a registered tag."""

    __slots__ = ()
    TAG: ClassVar[str]


_TAGS: dict[str, type[Message]] = {}


def _build(cls: type, base: type) -> Any:
    if base not in cls.__mro__:
        raise TypeError(f"{cls.__name__} must subclass {base.__name__}")
    dc = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
    hints = typing.get_type_hints(dc, include_extras=True)
    dc._specs = {
        f.name: _spec_for(hints[f.name], f"{dc.__name__}.{f.name}")
        for f in dataclasses.fields(dc)
    }
    return dc


def record(cls: type) -> Any:
    """Class decorator for a nested (untagged) schema type."""
    return _build(cls, Record)


def message(tag: str) -> Any:
    """Class decorator for a tagged message; the tag must be unique."""

    def wrap(cls: type) -> Any:
        if tag in _TAGS:
            raise TypeError(f"duplicate message tag {tag!r}")
        dc = _build(cls, Message)
        dc.TAG = tag
        _TAGS[tag] = dc
        return dc

    return wrap
