"""`Draft`: one network as read, before the rules have passed it."""

from __future__ import annotations

import dataclasses
from typing import Any

from l3ptp.controller.config.errors import BAD, join, ok
from l3ptp.controller.config.model import NetworkConfig, UnderlayConfig
from l3ptp.controller.config.schema import PREFIX_LISTS


@dataclasses.dataclass(slots=True)
class Draft:
    """One network as read: field values (possibly `BAD`) plus where they came from."""

    name: str
    path: str
    present: frozenset[str]
    values: dict[str, Any]
    underlay: dict[str, Any] | None

    def get(self, key: str) -> Any:
        return self.values.get(key, BAD)

    def key(self, key: str) -> str:
        return join(self.path, key)

    def build(self) -> NetworkConfig:
        """The NetworkConfig; only called when no error was recorded."""
        assert self.underlay is not None and ok(*self.values.values(), *self.underlay.values())
        values = dict(self.values)
        for key in PREFIX_LISTS:
            assert None not in values[key]
        return NetworkConfig(name=self.name, underlay=UnderlayConfig(**self.underlay), **values)


