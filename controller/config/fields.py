"""Generic typed field readers: each checks one decoded TOML value.

A reader (or the `Converter` a factory returns) takes the value, its key path
and the `Collector`; it returns the converted value, or records an error and
returns `BAD`.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from l3ptp.controller.config.errors import BAD, Bad, Collector, Converter
from l3ptp.controller.config.model import IPAddress, IPNetwork
from l3ptp.ipc.constants import MAX_PREFIXES_PER_LIST


def integer(lo: int, hi: int) -> Converter:
    def convert(value: Any, path: str, col: Collector) -> int | Bad:
        if isinstance(value, bool) or not isinstance(value, int):
            return col.type_error(path, "an integer", value)
        if not lo <= value <= hi:
            col.add(path, f"{value} is outside {lo}..{hi}")
            return BAD
        return value

    return convert


def number(lo: float, hi: float) -> Converter:
    """A float or integer (seconds), returned as float."""

    def convert(value: Any, path: str, col: Collector) -> float | Bad:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return col.type_error(path, "a number", value)
        if not math.isfinite(value) or not lo <= value <= hi:
            col.add(path, f"{value} is outside {lo:g}..{hi:g}")
            return BAD
        return float(value)

    return convert


def boolean(value: Any, path: str, col: Collector) -> bool | Bad:
    if not isinstance(value, bool):
        return col.type_error(path, "a boolean", value)
    return value


def choice(choices: tuple[str, ...]) -> Converter:
    def convert(value: Any, path: str, col: Collector) -> str | Bad:
        if not isinstance(value, str):
            return col.type_error(path, "a string", value)
        if value not in choices:
            col.add(path, f"{value!r} is not one of " + ", ".join(repr(c) for c in choices))
            return BAD
        return value

    return convert


def absolute_path(value: Any, path: str, col: Collector) -> str | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not value:
        col.add(path, "must not be empty")
        return BAD
    if "\0" in value:
        col.add(path, "must not contain a NUL character")
        return BAD
    if not value.startswith("/"):
        col.add(path, f"{value!r} is not an absolute path")
        return BAD
    return value


def optional_path(value: Any, path: str, col: Collector) -> str | Bad:
    """An absolute path, or "" for none."""
    if value == "":
        return ""
    return absolute_path(value, path, col)


def ip_address(value: Any, path: str, col: Collector) -> IPAddress | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        col.add(path, f"{value!r} is not a valid IP address")
        return BAD


def strict_prefix(value: Any, path: str, col: Collector) -> IPNetwork | Bad:
    """A strict prefix (no host bits set)."""
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        col.add(path, f"{value!r} is not a valid IP prefix")
        return BAD
    col.add(path, f"{value} has host bits set (did you mean {loose}?)")
    return BAD


def prefix_list(value: Any, path: str, col: Collector) -> tuple[IPNetwork | None, ...] | Bad:
    """Strict prefixes, no duplicates. An invalid entry is kept as None."""
    if not isinstance(value, list):
        return col.type_error(path, "an array", value)
    if len(value) > MAX_PREFIXES_PER_LIST:
        col.add(path, f"has {len(value)} entries, at most {MAX_PREFIXES_PER_LIST} allowed")
        return BAD
    out: list[IPNetwork | None] = []
    seen: dict[IPNetwork, int] = {}
    for i, item in enumerate(value):
        net = strict_prefix(item, f"{path}[{i}]", col)
        if isinstance(net, Bad):
            out.append(None)
        elif net in seen:
            col.add(f"{path}[{i}]", f"{net} duplicates {path}[{seen[net]}]")
            out.append(None)
        else:
            seen[net] = i
            out.append(net)
    return tuple(out)


