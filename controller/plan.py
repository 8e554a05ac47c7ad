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
* *live* networks differ only in what a running network takes on without a
  restart (`LIVE_FIELDS`: advertised, accepted routes, pinned peer keys, the
  key file; globally, the node's key file): their workers are told (a
  ROUTE_UPDATE to the peer, new keys: a renewal of the session without a gap,
  docs/protocol.md "Renewal"), not restarted. A key file whose *contents*
  changed is found by the caller (`reload`), not here.
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

__all__ = ["LIVE_FIELDS", "Plan", "diff"]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Network names, each in new-file order (removed: old-file order)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Only `LIVE_FIELDS` (or the node's key file) changed: applied to the running workers, no restart.
    live: tuple[str, ...] = ()
    #: Controller settings that changed but need a controller restart.
    restart_required: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.live or self.restart_required)

    def summary(self) -> str:
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("applied live", self.live),
                ("unchanged", self.unchanged),
            )
            if names
        ]
        if self.restart_required:
            parts.append("needs a controller restart: " + ", ".join(self.restart_required))
        return "; ".join(parts) or "no networks"


#: What a running network takes on without a restart (the node's key file too, see `_worker_globals`).
LIVE_FIELDS = ("advertised_routes", "accepted_routes", "peer_key", "peer_keys", "key_file")


def _worker_globals(config: Config) -> tuple[object, ...]:
    """Global settings that end up in every WorkerConfig and need a restart (not the node's key file)."""
    c = config.controller
    return (config.node.id, c.helper_socket, c.status_interval, c.worker_user)


def diff(old: Config | None, new: Config) -> Plan:
    """Compare the running configuration (None at first start) with `new`."""
    if old is None:
        return Plan(added=tuple(n.name for n in new.networks))
    globals_changed = _worker_globals(old) != _worker_globals(new)
    old_by_name = {n.name: n for n in old.networks}
    new_names = {n.name for n in new.networks}
    key_file_changed = old.node.key_file != new.node.key_file
    added, changed, live, unchanged = [], [], [], []
    for net in new.networks:
        before = old_by_name.get(net.name)
        if before is None:
            added.append(net.name)
        elif before == net and not globals_changed and not (key_file_changed and not net.key_file):
            unchanged.append(net.name)
        elif not globals_changed and dataclasses.replace(before, **{f: getattr(net, f) for f in LIVE_FIELDS}) == net:
            live.append(net.name)
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
    return Plan(tuple(added), removed, tuple(changed), tuple(unchanged), tuple(live), tuple(restart))
