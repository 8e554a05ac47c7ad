"""Readers of l3ptp's own value kinds: CPU lists, node ids, names, tunnel addresses, key fingerprints."""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any, Final

from l3ptp.controller.config.errors import BAD, Bad, Collector, Converter
from l3ptp.controller.config.model import IPInterface
from l3ptp.controller.config.schema import ACCOUNT_NAME_RE, CPU_MAX, FINGERPRINT_RE, NODE_ID_RE
from l3ptp.ipc.constants import IFNAME_ALLOWED, IFNAME_MAX, MAX_QUEUES, NODE_ID_MAX
from l3ptp.ipc.types import FINGERPRINT_CHARS, FINGERPRINT_DIGEST_LEN, FINGERPRINT_PREFIX


def cpu_list(value: Any, path: str, col: Collector) -> tuple[int, ...] | Bad:
    if not isinstance(value, list):
        return col.type_error(path, "a list of CPU numbers", value)
    if len(value) > MAX_QUEUES:
        col.add(path, f"at most {MAX_QUEUES} CPUs")
        return BAD
    out = []
    for i, cpu in enumerate(value):
        if isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu <= CPU_MAX:
            col.add(f"{path}[{i}]", f"expected a CPU number 0..{CPU_MAX}, got {cpu!r}")
            return BAD
        out.append(cpu)
    return tuple(out)


def node_id(value: Any, path: str, col: Collector) -> str | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not NODE_ID_RE.fullmatch(value):
        col.add(path, f"{value!r} must be 1..{NODE_ID_MAX} characters of [A-Za-z0-9._-]")
        return BAD
    return value


def account_name(value: Any, path: str, col: Collector) -> str | Bad:
    """A user or group name, or "" for none."""
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if value and not ACCOUNT_NAME_RE.fullmatch(value):
        col.add(path, f"{value!r} is not a valid user or group name ([a-z_][a-z0-9_-]*, at most 64 characters)")
        return BAD
    return value


def interface_prefix(value: Any, path: str, col: Collector) -> str | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if not 1 <= len(value) <= IFNAME_MAX - 1 or any(c not in IFNAME_ALLOWED for c in value) or value[0] == "-":
        col.add(
            path,
            f"{value!r} must be 1..{IFNAME_MAX - 1} characters of [a-z0-9-], not starting with '-'",
        )
        return BAD
    return value


def interface_problems(name: str, prefix: str | None) -> list[str]:
    """Why `name` is not a valid interface name with `prefix` (None: unknown)."""
    problems = []
    if not name:
        problems.append("must not be empty")
    elif any(c not in IFNAME_ALLOWED for c in name):
        problems.append("must use only the characters a-z, 0-9 and '-'")
    if len(name.encode()) > IFNAME_MAX:
        problems.append(f"is {len(name.encode())} bytes long, at most {IFNAME_MAX} allowed")
    if prefix is not None and (not name.startswith(prefix) or len(name) <= len(prefix)):
        problems.append(f"must start with interface_prefix {prefix!r} and be longer than it")
    return problems


_EXAMPLE_INTERFACE: Final = {4: "198.19.0.1/24", 6: "fd00:19::1/64"}


def tunnel_address(version: int) -> Converter:
    """An IPv4Interface or IPv6Interface (address with prefix length) of `version`."""

    def convert(value: Any, path: str, col: Collector) -> IPInterface | Bad:
        if not isinstance(value, str):
            return col.type_error(path, "a string", value)
        if "/" not in value:
            col.add(path, f"{value!r} needs a prefix length, like {_EXAMPLE_INTERFACE[version]}")
            return BAD
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            col.add(path, f"{value!r} is not a valid IPv{version} address with prefix length")
            return BAD
        if iface.version != version:
            col.add(path, f"{value} is an IPv{iface.version} address, expected IPv{version}")
            return BAD
        ip, net = iface.ip, iface.network
        for special in ("unspecified", "loopback", "multicast"):
            if getattr(ip, f"is_{special}"):
                col.add(path, f"{ip} is a {special} address")
                return BAD
        if ip.max_prefixlen - net.prefixlen >= 2:  # /31, /32, /127, /128 have no special host
            if ip == net.network_address:
                col.add(path, f"{iface} is the subnet's own address; use a host address of {net}")
                return BAD
            if version == 4 and ip == net.broadcast_address:
                col.add(path, f"{iface} is the broadcast address of {net}")
                return BAD
        return iface

    return convert


def peer_key(value: Any, path: str, col: Collector) -> str | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    if FINGERPRINT_RE.fullmatch(value) is None:
        col.add(
            path,
            f"must be {FINGERPRINT_PREFIX!r} followed by {FINGERPRINT_CHARS} characters of unpadded"
            f" standard base64 (a {FINGERPRINT_DIGEST_LEN}-byte digest)",
        )
        return BAD
    encoded = value[len(FINGERPRINT_PREFIX) :]
    try:
        digest = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:  # pragma: no cover - the pattern admits only valid base64
        digest = b""
    if len(digest) != FINGERPRINT_DIGEST_LEN or base64.b64encode(digest).decode().rstrip("=") != encoded:
        col.add(path, f"is not the canonical base64 of a {FINGERPRINT_DIGEST_LEN}-byte digest")
        return BAD
    return value




def peer_keys(value: Any, path: str, col: Collector) -> tuple[tuple[str, float], ...] | Bad:
    """`peer_keys`: fingerprints, each a string or a table ``{ key = "SHA256:...", not_after = <offset
    date-time> }``; (fingerprint, not-after as unix seconds, 0.0 = none) each."""
    import datetime

    from l3ptp.ipc.constants import PEER_KEYS_MAX

    if not isinstance(value, list) or not value:
        return col.type_error(path, "a non-empty list of fingerprints", value)
    if len(value) > PEER_KEYS_MAX:
        col.add(path, f"{len(value)} keys, at most {PEER_KEYS_MAX}")
        return BAD
    out: list[tuple[str, float]] = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        when: Any = None
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"key", "not_after"})
            if unknown or "key" not in item:
                col.add(ipath, "a table needs `key` and may have `not_after`" + (f"; unknown {unknown}" if unknown else ""))
                return BAD
            item, when = item["key"], item.get("not_after")
        fp = peer_key(item, ipath, col)
        if fp is BAD:
            return BAD
        if when is not None and not (isinstance(when, datetime.datetime) and when.tzinfo is not None):
            col.add(f"{ipath}.not_after", "must be a TOML date-time with an offset, e.g. 2027-01-31T00:00:00Z")
            return BAD
        out.append((str(fp), when.timestamp() if when is not None else 0.0))
    if len({k for k, _ in out}) != len(out):
        col.add(path, "lists a key twice")
        return BAD
    return tuple(out)
