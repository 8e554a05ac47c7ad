"""Constraint markers for schema fields, and the bounded aliases built from them.

The markers ride on ``typing.Annotated`` (``Annotated[int, Range(0, 255)]``,
``Annotated[str, Text(64, r"[a-z]+")]``...); ``ipc/schema.py`` reads them when
it compiles a message's fields into the specs of ``ipc/fieldspecs.py``. The
``DEFAULT_*`` caps apply to a field that carries no marker of its own.
Everything here is re-exported by ``ipc/schema.py``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Annotated

__all__ = [
    "DEFAULT_BYTES_MAX", "DEFAULT_ITEMS_MAX", "DEFAULT_TEXT_MAX", "IP", "U8", "U16", "U32", "U64",
    "AddressStr", "Blob", "IPKind", "InterfaceStr", "Items", "PrefixStr", "Range", "Text",
]


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
