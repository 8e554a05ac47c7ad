"""Reload planning: what changes between the running and the new configuration.

Pure. `diff(old, new)` sorts every network name into exactly one of
added / removed / changed / unchanged:

* a network is *unchanged* when its `NetworkConfig` compares equal (value
  equality of the frozen dataclass) **and** nothing global that its workers
  are started with changed (node id and key file, helper socket, status
  interval, worker user). Unchanged networks are not touched: their workers
  keep their PIDs and traffic keeps flowing.
* *changed* networks are restarted (down with the old config, up with the
  new one); *added* ones come up, *removed* ones go down.
* *readvertised* networks differ only in `advertised_routes`: their workers
  are told (a ROUTE_UPDATE to the peer), not restarted.
* settings that only take effect when the controller restarts (runtime_dir,
  admin_group, polkit, metrics) are listed in `restart_required` so the operator is
  told instead of being silently ignored.

``enabled`` is part of a network's config, so enabling or disabling a
network is a change; the caller brings a changed network up only if the new
config has it enabled.
"""

from __future__ import annotations

import dataclasses

from l3ptp.controller.config import Config

__all__ = ["Plan", "diff"]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Network names, each in new-file order (removed: old-file order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Only `advertised_routes` changed: told to the running workers, no restart.
    readvertised: tuple[str, ...] = ()
    #: Controller settings that changed but need a controller restart.
    restart_required: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.readvertised or self.restart_required)

    def summary(self) -> str:
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("routes re-advertised", self.readvertised),
                ("unchanged", self.unchanged),
            )
            if names
        ]
        if self.restart_required:
            parts.append("needs a controller restart: " + ", ".join(self.restart_required))
        return "; ".join(parts) or "no networks"


def _worker_globals(config: Config) -> tuple[object, ...]:
    """Global settings that end up in every WorkerConfig."""
    c = config.controller
    return (config.node, c.helper_socket, c.status_interval, c.worker_user)


def diff(old: Config | None, new: Config) -> Plan:
    """Compare the running configuration (None at first start) with `new`."""
    if old is None:
        return Plan(added=tuple(n.name for n in new.networks))
    globals_changed = _worker_globals(old) != _worker_globals(new)
    old_by_name = {n.name: n for n in old.networks}
    new_names = {n.name for n in new.networks}
    added, changed, readvertised, unchanged = [], [], [], []
    for net in new.networks:
        before = old_by_name.get(net.name)
        if before is None:
            added.append(net.name)
        elif before == net and not globals_changed:
            unchanged.append(net.name)
        elif not globals_changed and dataclasses.replace(before, advertised_routes=net.advertised_routes) == net:
            readvertised.append(net.name)
        else:
            changed.append(net.name)
    removed = tuple(n.name for n in old.networks if n.name not in new_names)
    restart = []
    if old.controller.runtime_dir != new.controller.runtime_dir:
        restart.append("controller.runtime_dir")
    if old.controller.admin_group != new.controller.admin_group:
        restart.append("controller.admin_group")
    if old.controller.polkit != new.controller.polkit:
        restart.append("controller.polkit")
    if old.metrics != new.metrics:
        restart.append("metrics")
    return Plan(tuple(added), removed, tuple(changed), tuple(unchanged), tuple(readvertised), tuple(restart))
