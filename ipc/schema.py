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

Layout
------
The constraint markers (``Range``, ``Text``, ``IP``...) and the ``U8``...
aliases live in ``ipc/constraints.py``; the field specs (``IntSpec``...
``RecordSpec``) in ``ipc/fieldspecs.py``. This module compiles type hints into
specs and holds ``Record``, ``Message``, ``@record`` and ``@message``; it
re-exports everything from the other two, so callers import from here.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Annotated, Any, ClassVar

# The constraint markers and the field specs live in their own modules; every
# name stays importable from here, where the messages modules and tests take them.
from .constraints import (
    DEFAULT_BYTES_MAX,
    DEFAULT_ITEMS_MAX,
    DEFAULT_TEXT_MAX,
    IP,
    U8,
    U16,
    U32,
    U64,
    AddressStr,
    Blob,
    InterfaceStr,
    IPKind,
    Items,
    PrefixStr,
    Range,
    Text,
)
from .errors import DecodeError, SchemaError
from .fieldspecs import (
    BoolSpec,
    BytesSpec,
    EnumSpec,
    FloatSpec,
    IntSpec,
    IPSpec,
    MapSpec,
    OptionalSpec,
    RecordSpec,
    Spec,
    TextSpec,
    TupleSpec,
    kind_name,
)

__all__ = [
    "DEFAULT_BYTES_MAX", "DEFAULT_ITEMS_MAX", "DEFAULT_TEXT_MAX", "IP", "U8", "U16", "U32", "U64",
    "AddressStr", "Blob", "BoolSpec", "BytesSpec", "DecodeError", "EnumSpec", "FloatSpec", "IPKind",
    "IPSpec", "IntSpec", "InterfaceStr", "Items", "MapSpec", "Message", "OptionalSpec", "PrefixStr",
    "Range", "Record", "RecordSpec", "SchemaError", "Spec", "Text", "TextSpec", "TupleSpec",
    "kind_name", "message", "record",
]

# Former private name of `kind_name`, kept importable from here.
_kind = kind_name

# --------------------------------------------------------------------------
# Compiling a field's type hint
# --------------------------------------------------------------------------


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
            raise DecodeError(f"expected map, got {kind_name(raw)}", path)
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
