"""Hypothesis strategies derived from the ipc schemas themselves.

`valid_messages(channel)` draws arbitrary *valid* instances of every message
type of a channel, straight from the field specs, so a new message or field is
covered by the round-trip and fuzz tests without writing a sample by hand.
Addresses come only from the test ranges (198.18.0.0/15 and fd00::/8).
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from l3ptp.ipc import schema
from l3ptp.ipc.codec import Channel

_V4 = ipaddress.ip_network("198.18.0.0/15")
_V6 = ipaddress.ip_network("fd00::/8")


def _address() -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return st.ip_addresses(network=_V4) | st.ip_addresses(network=_V6)


def _ip(kind: schema.IPKind) -> st.SearchStrategy[str]:
    if kind is schema.IPKind.ADDRESS:
        return _address().map(str)

    def with_len(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> st.SearchStrategy[str]:
        top = addr.max_prefixlen
        lo = 15 if addr.version == 4 else 8
        if kind is schema.IPKind.PREFIX:
            return st.integers(lo, top).map(lambda n: str(ipaddress.ip_network((addr, n), strict=False)))
        return st.integers(lo, top).map(lambda n: str(ipaddress.ip_interface((addr, n))))

    return _address().flatmap(with_len)


def spec_strategy(spec: schema.Spec) -> st.SearchStrategy[object]:
    if isinstance(spec, schema.BoolSpec):
        return st.booleans()
    if isinstance(spec, schema.IntSpec):
        lo = int(spec.lo) if spec.lo is not None else -(2**63)
        hi = int(spec.hi) if spec.hi is not None else 2**64 - 1
        return st.integers(lo, hi)
    if isinstance(spec, schema.FloatSpec):
        return st.floats(spec.lo, spec.hi, allow_nan=False, allow_infinity=False)
    if isinstance(spec, schema.IPSpec):
        return _ip(spec.kind)
    if isinstance(spec, schema.TextSpec):
        if spec.regex is not None:
            return st.from_regex(spec.regex, fullmatch=True).filter(lambda s: len(s) <= spec.max_len)
        return st.text(max_size=min(spec.max_len, 80))
    if isinstance(spec, schema.BytesSpec):
        return st.binary(min_size=spec.min_len, max_size=min(spec.max_len, max(spec.min_len, 80)))
    if isinstance(spec, schema.EnumSpec):
        return st.sampled_from(list(spec.enum_type))
    if isinstance(spec, schema.OptionalSpec):
        return st.none() | spec_strategy(spec.inner)
    if isinstance(spec, schema.TupleSpec):
        return st.lists(spec_strategy(spec.item), max_size=min(spec.max_items, 4)).map(tuple)
    if isinstance(spec, schema.MapSpec):
        return st.dictionaries(spec_strategy(spec.key), spec_strategy(spec.value), max_size=min(spec.max_items, 4))
    if isinstance(spec, schema.RecordSpec):
        return record_strategy(spec.cls)
    raise TypeError(f"no strategy for {spec!r}")


def record_strategy(cls: type[schema.Record]) -> st.SearchStrategy[object]:
    return st.builds(cls, **{name: spec_strategy(spec) for name, spec in cls._specs.items()})


def valid_messages(channel: Channel) -> st.SearchStrategy[schema.Message]:
    return st.one_of([record_strategy(t) for t in channel.types])  # type: ignore[misc]
