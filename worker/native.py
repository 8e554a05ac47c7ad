"""Which implementation of the worker's per-packet hot spots runs: C (`_fastpath`, worker/_fastpath.c) or the
pure-Python reference in `vnet`, `gro` and `tun_io`.

The C module is built with the package where a compiler is at hand (optional: a build without one installs
the pure-Python worker, which does the same, slower). `L3PTP_NATIVE=0` in the worker's environment (the
controller's, which the workers inherit) turns it off without a rebuild. The reference stays the definition
of every function: tests/fuzz/test_fuzz_native.py requires both to give the same answer for the same input.
The worker logs which one runs at start (`tun_mode ... native=`).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["ENABLED", "REASON", "fastpath"]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("L3PTP_NATIVE", "1").strip() == "0":
        return None, "python (L3PTP_NATIVE=0)"
    try:
        from . import _fastpath  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"python (the C module is not built: {exc})"
    return _fastpath, "c"


#: The C module, or None: the pure-Python reference runs.
fastpath, REASON = _load()
ENABLED = fastpath is not None
