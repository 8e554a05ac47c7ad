"""Builders of configuration documents (dicts as tomllib returns them) for tests.

`office()` is a valid listen network (IPv4 only), `lab()` a valid connect
network (IPv6 only, disjoint from office), `config()` a whole document;
keyword overrides replace keys, `DELETE` removes one.
"""

from __future__ import annotations

from typing import Any

#: Syntactically valid fingerprints (SHA-256 of arbitrary strings).
KEY_A = "SHA256:AhwYjdHfOzSfsQvKkuv9nbqlJhZJ9MKtvvUUxYGYn34"
KEY_B = "SHA256:nRegI8XomwiqsvGHVQV5uyESOoUH73xGuHbDqSHw2Vc"
KEY_C = "SHA256:v2qN6fozjnRYpAgRleL5A1fVm+r737+3ALM4uWF8XuI"

DELETE = object()


def _apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is DELETE:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def office(**overrides: Any) -> dict[str, Any]:
    """A valid listen network (IPv4 only)."""
    net = {
        "role": "listen",
        "local_ipv4": "198.19.0.1/24",
        "peer_ipv4": "198.19.0.2/24",
        "peer_key": KEY_A,
        "underlay": {"local": "198.18.0.1", "port": 4433},
    }
    return _apply(net, overrides)


def lab(**overrides: Any) -> dict[str, Any]:
    """A valid connect network (IPv6 only), disjoint from office()."""
    net = {
        "role": "connect",
        "local_ipv6": "fd00:19:1::1/64",
        "peer_ipv6": "fd00:19:1::2/64",
        "peer_key": KEY_B,
        "underlay": {"peer": "198.18.0.3", "port": 4433},
    }
    return _apply(net, overrides)


def underlay(net: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    net["underlay"] = _apply(dict(net["underlay"]), overrides)
    return net


def config(networks: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"node": {"id": "alpha", "key_file": "/etc/l3ptp/node.key"}}
    data["networks"] = {"office": office()} if networks is None else networks
    return _apply(data, sections)
