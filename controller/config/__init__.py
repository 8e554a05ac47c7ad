"""Controller configuration: one TOML file, parsed and validated in full.

Contract
--------
* `load_config` reads one file with `tomllib`; `parse_config` validates the
  decoded document. Both return an immutable `Config` or raise `ConfigError`.
  Nothing else escapes: an unreadable file, a TOML syntax error and every
  schema or policy violation become a `ConfigError`.
* Validation never stops at the first problem. `ConfigError.errors` holds
  every error found, each starting with the key path it is about, for example
  ``networks.office.mtu: 70000 is outside 576..9000``.
* The result is made of frozen, slotted dataclasses that compare and hash by
  value, so a reload can diff old and new networks with ``==``. Lists become
  tuples; addresses and prefixes become `ipaddress` objects.
* This package is pure: it reads the one file it is given and nothing else
  (key files, users and groups are not looked up; sockets are not bound).

Modules
-------
* model.py: the result dataclasses (`Config`, `NetworkConfig`, ...).
* errors.py: `ConfigError` and the `Collector` every reader reports into.
* schema.py: known keys, limits local to the file, patterns.
* fields.py: generic typed field readers (integer, number, choice, prefix...).
* values.py: readers of l3ptp's own value kinds (node id, tunnel address, peer key...).
* draft.py: `Draft`, one network as read, before it is built.
* sections.py: per-section readers ([node], [controller], [metrics], [networks.*]).
* reality.py: ``[networks.*.reality]``, the QUIC REALITY credential (issue 15).
* rules.py: cross-field rules, within a network and across networks.
* reader.py: the entry points `load_config` and `parse_config`.

docs/configuration.md documents every key and rule; keep the two in step.
"""

from __future__ import annotations

from l3ptp.controller.config.errors import ConfigError
from l3ptp.controller.config.model import (
    Config,
    ControllerConfig,
    IPAddress,
    IPInterface,
    IPNetwork,
    MetricsConfig,
    NetworkConfig,
    NodeConfig,
    RealityConfig,
    Role,
    UnderlayConfig,
)
from l3ptp.controller.config.reader import load_config, parse_config

__all__ = [
    "Config",
    "ConfigError",
    "ControllerConfig",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "MetricsConfig",
    "NetworkConfig",
    "NodeConfig",
    "RealityConfig",
    "Role",
    "UnderlayConfig",
    "load_config",
    "parse_config",
]
