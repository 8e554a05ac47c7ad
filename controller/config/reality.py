"""``[networks.<name>.reality]``: the QUIC REALITY credential (issue 15; docs/configuration.md).

    [networks.corp.reality]            # role = "listen"
    private_key_file = "/etc/l3ptp/reality.key"   # `l3ptp keygen --reality --out ...`
    short_ids = ["a1b2c3d4"]           # hex, up to 16 digits each; none: any
    camouflage = "www.example.com:443" # optional: where everyone else is relayed

    [networks.corp.reality]            # role = "connect"
    public_key = "<base64>"            # printed by `l3ptp keygen --reality`
    short_ids = ["a1b2c3d4"]           # at most one: the one it sends
    camouflage = "www.example.com:443" # optional: its host is the default server_name
    server_name = "www.example.com"    # optional: the SNI of the ClientHello
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any

from l3ptp.controller.config.draft import Draft
from l3ptp.controller.config.errors import BAD, Bad, Collector, join, ok
from l3ptp.controller.config.fields import absolute_path
from l3ptp.controller.config.model import RealityConfig
from l3ptp.controller.config.schema import PORT_MAX
from l3ptp.ipc.constants import HOSTNAME_MAX, REALITY_SHORT_ID_MAX, REALITY_SHORT_IDS_MAX

__all__ = ["REALITY_KEYS", "hostname", "parse_reality"]

REALITY_KEYS = ("private_key_file", "public_key", "short_ids", "camouflage", "server_name")
_ROLE_KEYS = {"listen": ("private_key_file",), "connect": ("public_key", "server_name")}
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def hostname(text: str) -> str | None:
    """What is wrong with `text` as a DNS name or IP literal; None if nothing."""
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > HOSTNAME_MAX:
        return f"is not 1..{HOSTNAME_MAX} characters"
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return "is neither an IP address nor a DNS name (labels of letters, digits and inner hyphens)"
    if name.replace(".", "").isdigit():
        return "is not a valid IP address"
    return None


def _public_key(value: Any, path: str, col: Collector) -> bytes | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        col.add(path, "is not 32 bytes in base64 (the public key `l3ptp keygen --reality` prints)")
        return BAD
    return raw


def _short_ids(value: Any, path: str, col: Collector) -> tuple[bytes, ...] | Bad:
    if not isinstance(value, list):
        return col.type_error(path, "a list of hex strings", value)
    if len(value) > REALITY_SHORT_IDS_MAX:
        col.add(path, f"{len(value)} short ids, at most {REALITY_SHORT_IDS_MAX}")
        return BAD
    out = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        if not isinstance(item, str) or not re.fullmatch(r"([0-9a-fA-F]{2}){0,%d}" % REALITY_SHORT_ID_MAX, item):
            col.add(ipath, f"{item!r} is not an even number of hex digits, at most {2 * REALITY_SHORT_ID_MAX}")
            return BAD
        out.append(bytes.fromhex(item))
    if len(set(out)) != len(out):
        col.add(path, "lists a short id twice")
        return BAD
    return tuple(out)


def _host_port(value: Any, path: str, col: Collector) -> tuple[str, int] | Bad:
    if not isinstance(value, str):
        return col.type_error(path, 'a string "host:port"', value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
    if m is None:
        col.add(path, f'{value!r} is not "host:port" (an IPv6 address in brackets: "[2001:db8::1]:443")')
        return BAD
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    problem = hostname(host)
    if problem or not 1 <= int(port) <= PORT_MAX:
        col.add(path, f"{host!r} {problem}" if problem else f"port {port} is outside 1..{PORT_MAX}")
        return BAD
    return host, int(port)


def _server_name(value: Any, path: str, col: Collector) -> str | Bad:
    if not isinstance(value, str):
        return col.type_error(path, "a string", value)
    problem = hostname(value)
    if problem:
        col.add(path, f"{value!r} {problem}")
        return BAD
    return value


def parse_reality(col: Collector, tbl: Any, draft: Draft) -> RealityConfig | None | Bad:
    """The network's REALITY table, None when it has none, BAD after recording an error."""
    if "reality" not in tbl:
        return None
    path = draft.key("reality")
    rtbl = col.table(tbl["reality"], path, REALITY_KEYS)
    if rtbl is None:
        return BAD
    role = draft.get("role")
    for other, keys in _ROLE_KEYS.items():
        for key in keys:
            if key in rtbl and role != other and role in _ROLE_KEYS:
                col.add(join(path, key), f"is for role {other!r}, this network's role is {role!r}")
    private = col.field(rtbl, path, "private_key_file", absolute_path, "")
    public = col.field(rtbl, path, "public_key", _public_key, b"")
    short_ids = col.field(rtbl, path, "short_ids", _short_ids, ())
    camouflage = col.field(rtbl, path, "camouflage", _host_port, ("", 0))
    server_name = col.field(rtbl, path, "server_name", _server_name, "")
    if role == "listen" and private == "":
        col.add(join(path, "private_key_file"), "required for role 'listen' (`l3ptp keygen --reality --out FILE`)")
    if role == "connect" and public == b"":
        col.add(join(path, "public_key"), "required for role 'connect' (the listener's REALITY public key)")
    if role == "connect" and isinstance(short_ids, tuple) and len(short_ids) > 1:
        col.add(join(path, "short_ids"), "role 'connect' sends one short id: list at most one")
    if not ok(private, public, short_ids, camouflage, server_name):
        return BAD
    host, port = camouflage
    if role == "connect" and not server_name and host:
        server_name = host
    return RealityConfig(private_key_file=private, public_key=public, short_ids=short_ids,
                         camouflage_host=host if role == "listen" else "", camouflage_port=port if role == "listen" else 0,
                         server_name=server_name)
