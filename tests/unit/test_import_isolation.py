"""The helper must never load QUIC, ZeroMQ or any worker/controller module."""

from __future__ import annotations

import json
import subprocess
import sys

HELPER_MODULES = ["l3ptp.helper", "l3ptp.ipc.helper_messages", "l3ptp.ipc.logsetup"]


def test_helper_imports_nothing_of_the_data_plane() -> None:
    code = f"""
import importlib, json, pkgutil, sys
import l3ptp.helper as pkg
mods = {HELPER_MODULES!r} + [f"l3ptp.helper.{{m.name}}" for m in pkgutil.iter_modules(pkg.__path__)]
for m in mods:
    importlib.import_module(m)
print(json.dumps({{"imported": mods, "loaded": sorted(sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    loaded = result["loaded"]
    forbidden = [
        m
        for m in loaded
        if m.split(".")[0] in {"aioquic", "qh3", "zmq", "prometheus_client", "cryptography"}
        or m.startswith(("l3ptp.worker", "l3ptp.controller"))
    ]
    assert forbidden == []
    assert "l3ptp.helper" in loaded
