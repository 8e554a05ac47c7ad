"""Entry points: `load_config` reads a file, `parse_config` validates a document."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

from l3ptp.controller.config.errors import BAD, Collector, ConfigError
from l3ptp.controller.config.model import Config, ControllerConfig, MetricsConfig, NodeConfig
from l3ptp.controller.config.rules import check_across_networks
from l3ptp.controller.config.schema import TOP_KEYS
from l3ptp.controller.config.sections import parse_controller, parse_metrics, parse_networks, parse_node


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at `path`.

    Raises `ConfigError` (with `source` set to the path) when the file cannot
    be read, is not UTF-8, is not valid TOML, or does not validate.
    """
    source = os.fsdecode(path)
    try:
        with open(source, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"cannot read configuration file: {exc.strerror or exc}"], source) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"configuration file is not valid UTF-8: {exc.reason} at byte {exc.start}"], source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], source) from exc
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate a decoded TOML document (as `tomllib` returns it).

    Returns the `Config`, or raises one `ConfigError` listing every error.
    `source` only labels the error.
    """
    col = Collector()
    top = col.table(data, "", TOP_KEYS)
    if top is None:
        raise ConfigError(col.errors, source)

    node = parse_node(col, top)
    controller = parse_controller(col, top)
    metrics = parse_metrics(col, top)
    prefix = controller["interface_prefix"] if controller is not None else BAD
    drafts = parse_networks(col, top, prefix)
    check_across_networks(col, drafts)

    if col.errors:
        raise ConfigError(col.errors, source)
    assert node is not None and controller is not None and metrics is not None
    return Config(
        node=NodeConfig(**node),
        controller=ControllerConfig(**controller),
        metrics=MetricsConfig(**metrics),
        networks=tuple(d.build() for d in drafts),
    )

