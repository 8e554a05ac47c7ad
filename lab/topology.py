"""The lab's addresses, its hosts and the files written for them.

Underlay between the two namespaces: 198.18.0.0/16; tunnel overlay
198.19.0.0/16 and fd00::/8; each host has a prefix on its loopback that it
advertises and the other accepts (`BEHIND`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Any

import tomli_w

__all__ = ["BASE_PORT", "BEHIND", "NETWORK", "OVERLAY4", "OVERLAY6", "REMOTE4", "REMOTE6", "UNDERLAY", "UNDERLAY6", "Host",
           "LabError", "behind_prefixes", "toml_text"]

UNDERLAY = ("198.18.0.1", "198.18.0.2")
UNDERLAY_PREFIXLEN = 24
#: The underlay with `Lab(underlay_ipv6=True)`.
UNDERLAY6 = ("fd00:18::1", "fd00:18::2")
UNDERLAY6_PREFIXLEN = 64
OVERLAY4 = ("198.19.0.1", "198.19.0.2")
OVERLAY6 = ("fd00:19::1", "fd00:19::2")
#: Addresses behind each host (on its loopback), advertised by it and
#: accepted by the other, so each side installs a route for the other's.
BEHIND = {"a": ("198.19.10.1", "fd00:19:10::1"), "b": ("198.19.20.1", "fd00:19:20::1")}
REMOTE4, REMOTE6 = BEHIND["b"]


def behind_prefixes(name: str) -> list[str]:
    v4, v6 = BEHIND[name]
    return [v4.rsplit(".", 1)[0] + ".0/24", v6.rsplit("::", 1)[0] + "::/64"]


BASE_PORT = 4433
NETWORK = "demo"


class LabError(RuntimeError):
    """A lab step failed; the message says which and why."""


@dataclasses.dataclass
class Host:
    """One side of the lab."""

    name: str  # "a" or "b"
    netns: str
    dir: str
    underlay: str
    overlay4: str
    overlay6: str
    config_path: str = ""
    policy_path: str = ""
    runtime_dir: str = ""
    helper_socket: str = ""
    fingerprint: str = ""
    config_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The `demo` network's table and its underlay table, as last written.
    network: dict[str, Any] = dataclasses.field(default_factory=dict)
    underlay_table: dict[str, Any] = dataclasses.field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)
    logs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def control_socket(self) -> str:
        return os.path.join(self.runtime_dir, "control.sock")


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    """TOML of `tables`, each named by its dotted table name ("networks.demo"); "" names the root table."""
    root: dict[str, Any] = {}
    for name, values in tables.items():
        node = root
        for part in name.split(".") if name else ():
            node = node.setdefault(part, {})
        node.update(values)
    return tomli_w.dumps(root)
